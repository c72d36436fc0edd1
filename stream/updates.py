"""The ``model-updates`` topic: the trainer (or an operator's rollback) announces a version; workers follow.

A message is JSON ``{"version": "v000007", "reason": "fine-tune" | "rollback" | ..., "ts": epoch ms}``, or
``{"shadow": "v000008" | null, "reason": "shadow", ...}`` when an operator starts or stops shadow scoring. The
model store stays the source of truth (workers load and verify the version from it); the message only says
"look now", so a lost message costs at most one poll of the store's CURRENT pointer.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from lrustream.kernel.config import Config
from lrustream.kernel.kafka import assigned_reader, produce_all, producer_config

log = logging.getLogger("lrustream.updates")


def announce(cfg: Config, version: str, reason: str, **extra: Any) -> None:
    """Publish a model-update message and wait for the broker's acknowledgement."""
    body = {"version": version, "reason": reason, "ts": int(time.time() * 1000), **extra}
    _publish(cfg, version.encode(), body)


class UpdateFollower:
    """Reads the messages published after it started. Each reader on its own: it assigns every partition at
    the end itself and commits nothing, so there is no group to join or rebalance, before or after a broker
    restart, and no committed offset to look up (that lookup can hang for ever, librdkafka #5586)."""

    def __init__(self, cfg: Config) -> None:
        self.consumer, _ = assigned_reader(cfg, cfg.topics.model_updates, f"{cfg.stream.app_id}-updates",
                                           from_beginning=False)

    def next_message(self, timeout_s: float) -> dict[str, Any] | None:
        """The next announcement or refresh request, parsed; None on timeout or a malformed message."""
        msg = self.consumer.poll(timeout_s)
        if msg is None or msg.error():
            return None
        try:
            body = json.loads(msg.value())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            log.warning("ignoring malformed model-update message at offset %s", msg.offset())
            return None
        return body

    def next_version(self, timeout_s: float) -> str | None:
        body = self.next_message(timeout_s)
        version = body.get("version") if body and "request" not in body else None
        return version if isinstance(version, str) else None

    def close(self) -> None:
        self.consumer.close()


def announce_shadow(cfg: Config, version: str | None) -> None:
    """Wake workers up to start (or, with None, stop) scoring the store's SHADOW version (stream/shadow.py)."""
    _publish(cfg, b"shadow", {"shadow": version, "reason": "shadow", "ts": int(time.time() * 1000)})


def request_refresh(cfg: Config, who: str) -> None:
    """Ask the trainer for a fine-tuning round now (a message on the model-updates topic workers ignore)."""
    _publish(cfg, b"refresh", {"request": "refresh", "by": who, "ts": int(time.time() * 1000)})


def _publish(cfg: Config, key: bytes, body: dict[str, Any]) -> None:
    """One message on the model-updates topic, acknowledged (:class:`KafkaUnavailable` otherwise)."""
    from confluent_kafka import Producer

    produce_all(Producer(producer_config(cfg)), cfg.topics.model_updates, [(key, json.dumps(body).encode())])
