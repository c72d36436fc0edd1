"""The ``items`` control topic: which items may be recommended (catalogue control).

Contract (also in stream/README.md):

- a compacted topic (``topics.items``, one partition); key = the external item id (UTF-8, as in events);
  value = JSON ``{"status": "blocked" | "active", "ts": epoch ms, "by": who}``; a null value (tombstone) is
  ``active``. The newest record of a key wins.
- Every worker reads the whole topic from its beginning (own consumer, no group, nothing committed), first to
  its end before it serves its first event, then as records arrive, and applies what it read between two
  micro-batches: a recommendation emitted after a worker has applied a block never holds the item. Blocking
  an item the serving vocabulary does not know yet holds too once a version that knows it is served.
- A record that is not this shape is logged and skipped; it never stops a worker.

Operators write it with ``lrustream items block|unblock|list`` (:func:`set_status`, :func:`read_blocked`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from lrustream.kernel.config import Config
from lrustream.kernel.errors import LrustreamError
from lrustream.kernel.kafka import assigned_reader, produce_all, producer_config, read_to_end
from stream.events import MAX_ID_CHARS

log = logging.getLogger("lrustream.catalogue")

STATUSES = ("blocked", "active")


class BadItemId(LrustreamError, ValueError):
    """An item id an operator typed cannot be an item id (empty, or longer than events allow)."""


def check_item_id(item: str) -> str:
    if not item or len(item) > MAX_ID_CHARS:
        raise BadItemId(f"an item id has 1 to {MAX_ID_CHARS} characters, got {len(item)}")
    return item


def parse(key: bytes | None, value: bytes | None) -> tuple[str, bool] | None:
    """``(item, blocked)`` from one control record; None (logged) when it is not one."""
    try:
        item = check_item_id(key.decode() if key else "")
        if value is None:
            return item, False
        status = json.loads(value).get("status")
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        return item, status == "blocked"
    except (ValueError, AttributeError) as exc:  # not an id, undecodable, not JSON, not an object, unknown status
        log.warning("ignoring a malformed items record: %s", exc)
        return None


class Blocked:
    """The set of blocked items, as the records read so far say."""

    def __init__(self) -> None:
        self.items: set[str] = set()

    def apply(self, records: list[tuple[bytes | None, bytes | None]]) -> bool:
        """Apply records in order; True when the set changed."""
        before = frozenset(self.items)
        for key, value in records:
            parsed = parse(key, value)
            if parsed is None:
                continue
            item, blocked = parsed
            if blocked:
                self.items.add(item)
            else:
                self.items.discard(item)
        return self.items != before


class CatalogueFollower:
    """Reads the items topic from its beginning, on its own (see :class:`stream.updates.UpdateFollower`)."""

    def __init__(self, cfg: Config) -> None:
        self.topic = cfg.topics.items
        self.consumer, self.partitions = assigned_reader(cfg, self.topic, f"{cfg.stream.app_id}-items",
                                                         from_beginning=True)

    def poll(self, timeout_s: float, max_records: int = 1000) -> list[tuple[bytes | None, bytes | None]]:
        """The records that arrived, waiting up to ``timeout_s`` for the first."""
        return [(m.key(), m.value()) for m in self.consumer.consume(max_records, timeout_s) if not m.error()]

    def read_to_end(self, timeout_s: float) -> list[tuple[bytes | None, bytes | None]]:
        """Every record up to the end offsets as they are now; raises :class:`TimeoutError` past ``timeout_s``."""
        return [r for batch in read_to_end(self.consumer, self.topic, self.partitions, self.poll, timeout_s)
                for r in batch]

    def close(self) -> None:
        self.consumer.close()


def set_status(cfg: Config, item: str, status: str, by: str) -> None:
    """Publish one control record and wait for the broker's acknowledgement."""
    from confluent_kafka import Producer

    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    body: dict[str, Any] = {"status": status, "ts": int(time.time() * 1000), "by": by}
    produce_all(Producer(producer_config(cfg)), cfg.topics.items,
                [(check_item_id(item).encode(), json.dumps(body).encode())])


def read_blocked(cfg: Config, timeout_s: float = 30.0) -> set[str]:
    """The items blocked now, read from the whole topic."""
    follower = CatalogueFollower(cfg)
    try:
        blocked = Blocked()
        blocked.apply(follower.read_to_end(timeout_s))
        return blocked.items
    finally:
        follower.close()
