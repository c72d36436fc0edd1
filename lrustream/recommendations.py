"""Read the recommendations topic back (``lrustream recommendations``), as any consumer of a deployment would.

A plain confluent-kafka consumer configured from our config (security settings included), reading with a
throwaway group that commits nothing; ``stream/README.md`` is the record contract it reads.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, Message
from confluent_kafka import TopicPartition as TP

from lrustream.kernel.config import Config
from lrustream.kernel.errors import LrustreamError
from lrustream.kernel.kafka import (
    KafkaUnavailable,
    client_logger,
    high_watermarks,
    librdkafka_config,
    reason,
    topic_partitions,
)


class ReadError(LrustreamError):
    """The recommendations topic cannot be read to its end (metadata, a fatal client error, no progress)."""


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _partitions(consumer: Consumer, topic: str, timeout_s: float) -> list[int]:
    try:
        return topic_partitions(consumer, topic, timeout_s)
    except KafkaException as exc:
        raise KafkaUnavailable(f"cannot read metadata of {topic}: {reason(exc)}") from None


def _high_watermarks(consumer: Consumer, topic: str, partitions: list[int], timeout_s: float) -> dict[int, int]:
    try:
        return high_watermarks(consumer, topic, partitions, timeout_s)
    except KafkaException as exc:
        raise KafkaUnavailable(f"cannot read end offsets of {topic}: {reason(exc)}") from None


def _decode_record(msg: Message, user: str | None) -> dict[str, Any] | None:
    """The record's JSON object (None when filtered out or unreadable, the latter with a warning)."""
    try:
        value = json.loads(msg.value() or b"")
    except (ValueError, RecursionError):
        warn(f"skipping non-JSON record at {msg.topic()}[{msg.partition()}]@{msg.offset()}")
        return None
    if not isinstance(value, dict):
        warn(f"skipping non-object record at {msg.topic()}[{msg.partition()}]@{msg.offset()}")
        return None
    if user is not None and value.get("user_id") != user:
        return None
    return value


class _Reader:
    """Assigned partitions (no consumer-group join, so no rebalance wait) and, without follow, where to stop."""

    def __init__(self, cfg: Config, follow: bool, from_beginning: bool, timeout_s: float) -> None:
        self.topic = cfg.topics.recommendations
        self.follow = follow
        self.timeout_s = timeout_s
        self.consumer = Consumer(librdkafka_config(cfg, logger=client_logger(), **{
            "group.id": f"lrustream-recs-{uuid.uuid4().hex[:12]}", "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "enable.partition.eof": True}))
        try:
            partitions = _partitions(self.consumer, self.topic, timeout_s)
            high = _high_watermarks(self.consumer, self.topic, partitions, timeout_s)
        except LrustreamError:
            self.consumer.close()
            raise
        # the stop line: end offsets observed now (from the end there is nothing to read without follow)
        self.stop = dict(high) if from_beginning else dict.fromkeys(high, 0)
        self.pending = set() if follow else {p for p, h in self.stop.items() if h > 0}
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        self.consumer.assign([TP(self.topic, p, start) for p in partitions])

    def done(self) -> bool:
        return not self.follow and not self.pending

    def accept(self, msg: Message) -> bool:
        """Whether to yield this message; updates which partitions are still being read up to their stop line."""
        err = msg.error()
        p = msg.partition()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                if not self.follow:
                    self.pending.discard(p)
                return False
            if err.fatal():
                raise ReadError(f"reading {self.topic}: {err.str()}")
            warn(f"reading {self.topic}: {err.str()}")
            return False
        if self.follow:
            return True
        if p not in self.pending or msg.offset() >= self.stop[p]:
            self.pending.discard(p)
            return False
        if msg.offset() + 1 >= self.stop[p]:
            self.pending.discard(p)
        return True

    def batches(self) -> Iterator[list[Message]]:
        """Fetched messages until done; without follow, ``timeout_s`` without any progress is an error."""
        idle_since = time.monotonic()
        while not self.done():
            msgs = self.consumer.consume(num_messages=500, timeout=0.5)
            if msgs:
                idle_since = time.monotonic()
                yield msgs
            elif not self.follow and time.monotonic() - idle_since > self.timeout_s:
                raise ReadError(f"{self.topic}: no progress for {self.timeout_s:g} s before reaching the end "
                                f"(partitions {sorted(self.pending)} unfinished)")


def read_recommendations(cfg: Config, follow: bool = False, user: str | None = None, from_beginning: bool = True,
                         timeout_s: float = 10) -> Iterator[dict[str, Any]]:
    """Recommendation records (decoded JSON objects) of the recommendations topic, optionally of one user.

    Without ``follow``: every record up to the end offsets observed at the start, then stop. With ``follow``:
    keep reading until interrupted (partitions added later are not picked up). Reads with a throwaway group
    that commits nothing, so running it never disturbs other consumers. ``timeout_s`` bounds metadata
    requests and, without follow, how long the reader waits without progress before giving up."""
    reader = _Reader(cfg, follow, from_beginning, timeout_s)
    try:
        for batch in reader.batches():
            for msg in batch:
                if reader.accept(msg) and (value := _decode_record(msg, user)) is not None:
                    yield value
    finally:
        reader.consumer.close()
