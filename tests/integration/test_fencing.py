"""A former owner cannot overwrite the new owner's state, on the real broker.

Two workers' processors, each with its own RocksDB and changelog producer, share one changelog topic. The first
is stopped in the middle of a batch, just before it writes the changelog; the partition moves to the second (a
rebalance), which restores, serves more events and commits; then the first goes on with its batch. Kafka must
refuse the former owner's records (its transactional producer is fenced), and what any later owner restores
must equal a run that never moved.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from lrustream.kernel.config import Config
from lrustream.kernel.kafka import librdkafka_config, producer_config
from models.store import ModelStore
from state.store import Changelog, StateError, StateStore
from stream.processor import Input, Processor
from stream.serving import Serving
from stream.topics import create_topics
from tests.streamkit import build_processor, publish_model


def _events(first: int, last: int) -> list[Input]:
    """Events of partition 0 at offsets first..last-1, seven users, each event a different item."""
    out = []
    for k in range(first, last):
        value = json.dumps({"user_id": f"u{k % 7}", "item_id": f"i{1 + k % 40}", "ts": 1000 + k}).encode()
        out.append(Input(0, k, f"u{k % 7}".encode(), value, 1000 + k))
    return out


class PausingChangelog(Changelog):
    """A real changelog whose next publish waits until ``resume`` is set (the worker stalls mid-batch: a long
    GC pause, a stopped process) after telling ``paused``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pause_next = False
        self.paused, self.resume = threading.Event(), threading.Event()

    def publish(self, entries: dict[int, dict[bytes, bytes | None]]) -> dict[int, int]:
        if self.pause_next:
            self.pause_next = False
            self.paused.set()
            assert self.resume.wait(60)
        return super().publish(entries)


def _changelog(cfg: Config) -> Changelog:
    return Changelog(librdkafka_config(cfg), cfg.topics.state_changelog)


def _processor(cfg: Config, store: StateStore) -> Processor:
    producer = Producer(producer_config(cfg, **{"acks": "all"}))
    return build_processor(cfg, Serving.load(ModelStore(cfg.model_store.dir)), store, producer)


def _states(processor: Processor, users: list[str]) -> dict[str, tuple[bytes, int, list[int]]]:
    out = {}
    for user in users:
        record = processor.store.get(0, user)
        assert record is not None, user
        out[user] = (record.state, record.offset, [int(i) for i in record.window])
    return out


def _restored(cfg: Config, tmp_path: Path, name: str) -> Processor:
    """A third worker that takes the partition over now: what it restores is what the changelog holds."""
    processor = _processor(cfg, StateStore(tmp_path / name, _changelog(cfg)))
    processor.store.ensure_ready(0)
    return processor


def test_a_former_owner_mid_batch_is_fenced_and_its_retry_restores_first(kafka_cfg: Config, tmp_path: Path
                                                                          ) -> None:
    create_topics(kafka_cfg)
    publish_model(kafka_cfg, num_items=40)
    users = [f"u{k}" for k in range(7)]
    clean = _processor(kafka_cfg, StateStore(tmp_path / "clean"))  # the run that never moved (no changelog)
    for first, last in ((0, 10), (10, 30), (30, 40)):
        clean.process(_events(first, last))

    old_changelog = PausingChangelog(librdkafka_config(kafka_cfg), kafka_cfg.topics.state_changelog)
    old = _processor(kafka_cfg, StateStore(tmp_path / "old-owner", old_changelog))
    old.process(_events(0, 10))
    old_changelog.pause_next = True
    failure: list[BaseException] = []

    def in_flight() -> None:
        try:
            old.process(_events(10, 20))
        except BaseException as exc:  # handed to the test thread
            failure.append(exc)

    thread = threading.Thread(target=in_flight)
    thread.start()
    assert old_changelog.paused.wait(60), "the old owner reached its changelog write"

    # the rebalance: the partition moves to a new owner
    new = _processor(kafka_cfg, StateStore(tmp_path / "new-owner", _changelog(kafka_cfg)))
    new.process(_events(10, 30))
    old_changelog.resume.set()
    thread.join(60)

    after_takeover = _restored(kafka_cfg, tmp_path, "third")
    assert after_takeover.store.applied_offset(0) == 29
    assert _states(after_takeover, users) == _states(new, users), \
        "the changelog holds the new owner's states, not the former owner's late batch"
    assert len(failure) == 1 and isinstance(failure[0], StateError) and "claimed" in str(failure[0]), failure
    assert old.store.applied_offset(0) == 9, "the fenced batch was not written to the former owner's RocksDB"
    assert old.metrics.registry.get_sample_value("lrustream_fenced_batches_total") == 1

    # the former owner retries its batch (as the worker does after any failure): it claims the partition again,
    # restores the new owner's commits first, and applies nothing twice; the new owner is then fenced in turn
    old.store.mark_stale()
    retried = old.process(_events(10, 20))
    assert retried.skipped == 10 and retried.served == 0
    with pytest.raises(StateError, match="claimed"):
        new.process(_events(30, 40))
    new.store.mark_stale()
    assert new.process(_events(30, 40)).served == 10
    final = _restored(kafka_cfg, tmp_path, "fourth")
    assert final.store.applied_offset(0) == 39
    assert _states(final, users) == _states(clean, users), "exactly once per state, as if nothing had moved"
    for processor in (old, new, after_takeover, final, clean):
        processor.store.close()
