"""State benchmark that prints numbers: what a micro-batch's changelog commit costs.

``commit_cost`` times ``Changelog.publish`` for batches of ``records`` user records spread over ``partitions``
changelog partitions, on the broker the config points at: each partition's writer commits one Kafka
transaction per batch (the fencing that keeps one writer per partition, state/README.md), so the cost is a few
round trips to the transaction coordinator on top of the records' acknowledgement. For comparison it also times
the same records sent by a plain idempotent producer and flushed (what the commit would cost without fencing).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from state.store import Changelog


def _entries(partitions: int, records: int, size: int) -> dict[int, dict[bytes, bytes | None]]:
    per = max(1, records // partitions)
    return {p: {f"u:{p}-{k}".encode(): b"x" * size for k in range(per)} for p in range(partitions)}


def _plain(conf: dict[str, Any], topic: str, entries: dict[int, dict[bytes, bytes | None]]) -> Callable[[], None]:
    from confluent_kafka import Producer

    producer = Producer({**conf, "enable.idempotence": True, "acks": "all", "linger.ms": 2,
                         "compression.type": "lz4"})

    def send() -> None:
        for p, items in entries.items():
            for key, value in items.items():
                producer.produce(topic, value, key, partition=p)
        assert producer.flush(30) == 0

    return send


def commit_cost(conf: dict[str, Any], partitions: int = 2, records: int = 200, size: int = 300,
                batches: int = 200, log: Callable[[str], None] = print) -> dict[str, float]:
    """Milliseconds per batch, transactional (as the worker commits) and plain; the topic is made here."""
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"bench-changelog-{uuid.uuid4().hex[:6]}"
    admin = AdminClient(conf)
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result()
    entries = _entries(partitions, records, size)
    changelog = Changelog(conf, topic)
    for p in range(partitions):
        changelog.claim(p)
    runs = {"transactional": lambda: changelog.publish(entries), "plain": _plain(conf, topic, entries)}
    out = {}
    for name, run in runs.items():
        run()  # warm up
        t0 = time.perf_counter()
        for _ in range(batches):
            run()
        out[name] = (time.perf_counter() - t0) / batches * 1000
        log(f"{name:13s}: {out[name]:.2f} ms per batch of {records} records over {partitions} partitions")
    changelog.close()
    log(f"transactional / plain: {out['transactional'] / out['plain']:.1f}x")
    return out
