"""Tools for users of the stream: replay a data set as interaction events, read the recommendations back.

Both are plain confluent-kafka clients configured from our config (security settings included), so they
behave as any producer or consumer of a deployment would; ``stream/README.md`` is the contract they follow.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator
from itertools import chain, islice
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka import TopicPartition as TP

from lrustream.config import Config
from stream.events import BadEvent, encode_event
from stream.kafka import MissingTopic, high_watermarks, librdkafka_config, producer_config, topic_partitions
from stream.topics import create_topics

POLL_EVERY = 1000  # serve delivery callbacks (and the progress bar) every this many events


class ToolError(RuntimeError):
    """A failure the user can act on (broker unreachable, delivery failed, topic missing): one line, exit 1."""

    user_facing = True


class _Once(logging.Filter):
    """Lets each distinct librdkafka message through once a minute: an unreachable broker otherwise prints the
    same 'connection refused' line ten times a second, while a later outage should still be reported."""

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s = every_s
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = re.sub(r"\d+ms", "", record.getMessage())
        now = time.monotonic()
        if now - self.last.get(text, -self.every_s) < self.every_s:
            return False
        if len(self.last) > 1000:
            self.last.clear()
        self.last[text] = now
        return True


def client_logger() -> logging.Logger:
    """Where our tools' Kafka clients log: stderr, WARNING and up, repeats muted for a minute."""
    logger = logging.getLogger("lrustream.tools.kafka")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("kafka: %(message)s"))
        handler.addFilter(_Once())
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    return logger


def _reason(exc: KafkaException) -> str:
    """The readable part of a KafkaException (its KafkaError's text, not the repr)."""
    err = exc.args[0] if exc.args else None
    return err.str() if isinstance(err, KafkaError) else str(exc)


# ----- replay ------------------------------------------------------------------------------------------------
class Pacer:
    """Paces events at ``rate`` per second against an absolute schedule (event n is due at t0 + n / rate), so
    sleep overshoot never accumulates. A stall longer than ``max_burst_s`` is forgiven, not caught up in a burst.
    """

    def __init__(self, rate: float, max_burst_s: float = 1.0) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.interval = 1.0 / rate
        self.max_burst_s = max_burst_s
        self.due = time.monotonic()

    def wait_s(self) -> float:
        """Seconds until the next event is due (<= 0: send now); books the event."""
        now = time.monotonic()
        wait = self.due - now
        self.due = max(self.due, now - self.max_burst_s) + self.interval
        return wait


class _Deliveries:
    """Delivery reports: counts successes and failures, keeps the first error for the message."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.first_error: str | None = None

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.ok += 1
            return
        self.failed += 1
        if self.first_error is None:
            self.first_error = err.str()


def _produce(producer: Producer, topic: str, key: bytes, value: bytes, on_delivery: _Deliveries) -> None:
    """Produce one record; when librdkafka's queue is full, serve callbacks until there is room."""
    while True:
        try:
            producer.produce(topic, value, key, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.1)


def pace(producer: Producer, wait_s: float) -> None:
    """Wait by polling the producer (deliveries keep flowing); under 1 ms is not worth a wakeup."""
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0.001:
        producer.poll(left)


def _ensure_topics(cfg: Config, timeout_s: float) -> None:
    try:
        create_topics(cfg, timeout_s=timeout_s)
    except KafkaException as exc:
        raise ToolError(f"cannot create topics on {cfg.kafka.bootstrap_servers}: {_reason(exc)}") from None


def _progress_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="ev", unit_scale=True, dynamic_ncols=True, file=sys.stderr)


def replay(cfg: Config, data: str, rate: float | None = None, limit: int | None = None,
           progress: bool = False, timeout_s: float = 30.0, flush_timeout_s: float = 60.0) -> int:
    """Publish a data set's interactions in global time order to the interactions topic, keyed by user id.

    ``rate`` limits events per second (None = as fast as the broker takes them); ``limit`` stops after that
    many events. Returns the number of events published (all acknowledged). Raises :class:`ToolError` when the
    topics cannot be made within ``timeout_s``, or when any delivery failed or was still unacknowledged after
    ``flush_timeout_s``: a silent partial replay would skew everything measured downstream."""
    from trainer.data import load_sequences

    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    seqs = load_sequences(data)  # same preprocessing as training, so served items are the trained ones
    total = seqs.num_interactions if limit is None else min(limit, seqs.num_interactions)
    ordered = seqs.events()
    first = next(ordered, None)  # formats without timestamps fail here, before anything touches Kafka
    events = islice(chain([first] if first is not None else [], ordered), limit)
    _ensure_topics(cfg, timeout_s)
    producer = Producer(producer_config(cfg, logger=client_logger()))
    deliveries = _Deliveries()
    bar = _progress_bar(progress, total)
    try:
        sent = _publish(producer, cfg.topics.interactions, events, rate, deliveries, bar)
    except KeyboardInterrupt:
        producer.flush(5)  # what was handed over is not lost on Ctrl-C
        raise
    finally:
        if bar is not None:
            bar.close()
    left = producer.flush(flush_timeout_s)
    _check_deliveries(cfg, deliveries, sent, left)
    return sent


def _publish(producer: Producer, topic: str, events: Iterator[tuple[str, str, int]], rate: float | None,
             deliveries: _Deliveries, bar: Any) -> int:
    pacer = Pacer(rate) if rate is not None else None
    sent = 0
    for n, (user, item, ts_ms) in enumerate(events):
        try:
            key, value = encode_event(user, item, ts_ms)
        except BadEvent as exc:
            raise ToolError(f"event {n} of the data set breaks the event contract: {exc}") from None
        if pacer is not None:
            pace(producer, pacer.wait_s())
        _produce(producer, topic, key, value, deliveries)
        sent += 1
        if sent % POLL_EVERY == 0:
            producer.poll(0)
            if bar is not None:
                bar.update(POLL_EVERY)
            if deliveries.failed:  # stop early: the broker refuses, more events would fail the same way
                break
    if bar is not None:
        bar.update(sent % POLL_EVERY)
    return sent


def _check_deliveries(cfg: Config, deliveries: _Deliveries, sent: int, left: int) -> None:
    topic = cfg.topics.interactions
    if deliveries.failed:
        raise ToolError(f"{deliveries.failed} of {sent} events were not delivered to {topic} "
                        f"({cfg.kafka.bootstrap_servers}): {deliveries.first_error}")
    if left:
        raise ToolError(f"{left} of {sent} events still unacknowledged by {cfg.kafka.bootstrap_servers} "
                        f"after the flush timeout; topic {topic}")


# ----- recommendations ------------------------------------------------------------------------------------
def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _partitions(consumer: Consumer, topic: str, timeout_s: float) -> list[int]:
    try:
        return topic_partitions(consumer, topic, timeout_s)
    except KafkaException as exc:
        raise ToolError(f"cannot read metadata of {topic}: {_reason(exc)}") from None
    except MissingTopic as exc:
        raise ToolError(str(exc)) from None


def _high_watermarks(consumer: Consumer, topic: str, partitions: list[int], timeout_s: float) -> dict[int, int]:
    try:
        return high_watermarks(consumer, topic, partitions, timeout_s)
    except KafkaException as exc:
        raise ToolError(f"cannot read end offsets of {topic}: {_reason(exc)}") from None


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
        except ToolError:
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
                raise ToolError(f"reading {self.topic}: {err.str()}")
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
                raise ToolError(f"{self.topic}: no progress for {self.timeout_s:g} s before reaching the end "
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
