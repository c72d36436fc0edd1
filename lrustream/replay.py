"""Replay a data set as interaction events (``lrustream replay``), as any producer of a deployment would.

A plain confluent-kafka producer configured from our config (security settings included), keyed and
partitioned as ``stream/README.md`` requires; lrustream/recommendations.py reads the answers back.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Iterator
from itertools import chain, islice
from typing import Any

from confluent_kafka import KafkaException, Producer

from lrustream.kernel.config import Config
from lrustream.kernel.errors import LrustreamError
from lrustream.kernel.kafka import (
    Deliveries,
    KafkaUnavailable,
    await_deliveries,
    client_logger,
    produce,
    producer_config,
    reason,
)
from stream.events import BadEvent, encode_event
from stream.topics import create_topics
from trainer.data import load_sequences

POLL_EVERY = 1000  # serve delivery callbacks (and the progress bar) every this many events


class ReplayError(LrustreamError):
    """A data set event the event contract refuses (nothing after it is published)."""


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


def pace(producer: Producer, wait_s: float) -> None:
    """Wait by polling the producer (deliveries keep flowing); under 1 ms is not worth a wakeup."""
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0.001:
        producer.poll(left)


def _warm_up(producer: Producer, pacer: Pacer, timeout_s: float = 10.0) -> None:
    """Wait until the first event is acknowledged, then start the schedule. A new producer holds its first
    records until it has connected and obtained its idempotent producer id (about half a second): at a paced
    rate every event of that half-second would carry that wait in its latency, which is not the consumer's."""
    producer.flush(timeout_s)
    pacer.due = time.monotonic()


def _ensure_topics(cfg: Config, timeout_s: float) -> None:
    try:
        create_topics(cfg, timeout_s=timeout_s)
    except KafkaException as exc:
        raise KafkaUnavailable(f"cannot create topics on {cfg.kafka.bootstrap_servers}: {reason(exc)}") from None


def _progress_bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="ev", unit_scale=True, dynamic_ncols=True, file=sys.stderr)


def replay(cfg: Config, data: str, rate: float | None = None, limit: int | None = None,
           progress: bool = False, timeout_s: float = 30.0, flush_timeout_s: float = 60.0) -> int:
    """Publish a data set's interactions in global time order to the interactions topic, keyed by user id.

    ``rate`` limits events per second (None = as fast as the broker takes them); ``limit`` stops after that
    many events. Returns the number of events published (all acknowledged). Raises :class:`KafkaUnavailable` when
    the topics cannot be made within ``timeout_s``, or when any delivery failed or was still unacknowledged
    after ``flush_timeout_s`` (a silent partial replay would skew everything measured downstream), and
    :class:`ReplayError` for an event the event contract refuses."""

    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    seqs = load_sequences(data)  # same preprocessing as training, so served items are the trained ones
    total = seqs.num_interactions if limit is None else min(limit, seqs.num_interactions)
    ordered = seqs.events()
    first = next(ordered, None)  # formats without timestamps fail here, before anything touches Kafka
    events = islice(chain([first] if first is not None else [], ordered), limit)
    _ensure_topics(cfg, timeout_s)
    # a paced replay stands for producers that send each event as it happens: it lingers 1 ms, not 5
    producer = Producer(producer_config(cfg, logger=client_logger(), **({"linger.ms": 1} if rate else {})))
    deliveries = Deliveries()
    bar = _progress_bar(progress, total)
    collecting = gc.isenabled()
    gc.disable()  # a full collection walks the whole loaded data set: a paced replay would stall, then burst
    try:
        sent = _publish(producer, cfg.topics.interactions, events, rate, deliveries, bar)
    except KeyboardInterrupt:
        producer.flush(5)  # what was handed over is not lost on Ctrl-C
        raise
    finally:
        if collecting:
            gc.enable()
        if bar is not None:
            bar.close()
    await_deliveries(producer, deliveries, f"{sent} events to {cfg.topics.interactions} on "
                     f"{cfg.kafka.bootstrap_servers}", flush_timeout_s)
    return sent


def _publish(producer: Producer, topic: str, events: Iterator[tuple[str, str, int]], rate: float | None,
             deliveries: Deliveries, bar: Any) -> int:
    pacer = Pacer(rate) if rate is not None else None
    sent = 0
    for n, (user, item, ts_ms) in enumerate(events):
        try:
            key, value = encode_event(user, item, ts_ms)
        except BadEvent as exc:
            raise ReplayError(f"event {n} of the data set breaks the event contract: {exc}") from None
        if pacer is not None:
            pace(producer, pacer.wait_s())
        produce(producer, topic, value, key, on_delivery=deliveries, poll_s=0.1)
        sent += 1
        if pacer is not None and sent == 1:
            _warm_up(producer, pacer)
        if sent % POLL_EVERY == 0:
            producer.poll(0)
            if bar is not None:
                bar.update(POLL_EVERY)
            if deliveries.failed:  # stop early: the broker refuses, more events would fail the same way
                break
    if bar is not None:
        bar.update(sent % POLL_EVERY)
    return sent
