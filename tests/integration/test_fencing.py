"""A former owner cannot overwrite the new owner's state, on the real broker.

Two workers' processors, each with its own RocksDB and changelog producer, share one changelog topic. The first
is stopped in the middle of a batch, just before it writes the changelog; the partition moves to the second (a
rebalance), which restores, serves more events and commits; then the first goes on with its batch. Kafka must
refuse the former owner's records (its transactional producer is fenced), and what any later owner restores
must equal a run that never moved.

The same through two ``lrustream worker`` processes (slow tier): the first is held inside its commit step by the
pipeline's test fault-injection point and frozen there, the group hands its partitions to the second, and the
first, resumed, must have its commit fenced.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from lrustream.kernel.config import Config
from lrustream.kernel.kafka import librdkafka_config, producer_config
from models.store import ModelStore
from state.store import APPLIED_KEY, Changelog, StateError, StateStore
from stream.pipeline import HOLD_COMMIT_ENV
from stream.processor import Input, Processor
from stream.serving import Serving
from stream.topics import create_topics
from tests.streamkit import (
    EVENTS_TS0,
    WorkerProcess,
    build_processor,
    produce_events,
    publish_model,
    read_topic,
    recommendations,
    synthetic_events,
)


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


# ----- a worker frozen inside its commit (slow tier) ------------------------------------------------------------
PHASE = 100  # events produced per phase


def _wait(what: str, done: Any, workers: tuple[WorkerProcess, ...], timeout_s: float = 90.0) -> None:
    """Wait until ``done()`` is true; fail with ``what`` and the workers' logs after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} after {timeout_s:.0f} s:\n" + "\n".join(w.tail() for w in workers))
        time.sleep(0.2)


def _owns(worker: WorkerProcess, partitions: int) -> bool:
    """The worker is healthy and owns ``partitions`` input partitions."""
    try:
        return len(json.loads(worker.get("/health")).get("partitions", [])) >= partitions
    except OSError:
        return False


def _committed_all(worker: WorkerProcess, served: float) -> bool:
    """The worker has served ``served`` events and committed everything it applied (no micro-batch in hand)."""
    return (worker.get_metric("lrustream_recommendations_total") >= served
            and "batch_in_progress_s" not in worker.health())


def _markers(cfg: Config, partition: int) -> list[int]:
    """The applied-offset markers of ``partition``'s committed changelog transactions, in the order written."""
    changelog = _changelog(cfg)
    try:
        return [struct.unpack_from("<q", value)[0] for _, key, value in changelog.read(partition, -1)
                if key == APPLIED_KEY and value is not None]
    finally:
        changelog.close()


def _inputs(cfg: Config, expect: int) -> list[Input]:
    """Every record of the input topic, as the workers were given them."""
    return [Input(m.partition(), m.offset(), m.key(), m.value(), m.timestamp()[1])
            for m in read_topic(cfg, cfg.topics.interactions, expect=expect)]


def _all_states(processor: Processor, inputs: list[Input]) -> dict[tuple[int, str], tuple[bytes, int, list[int]]]:
    out = {}
    for p, user in {(i.partition, i.key.decode()) for i in inputs if i.key}:
        record = processor.store.get(p, user)
        assert record is not None, (p, user)
        out[(p, user)] = (record.state, record.offset, [int(i) for i in record.window])
    return out


def _served(cfg: Config, expect: int, workers: tuple[WorkerProcess, ...]) -> list[dict]:
    """The recommendations, once every one of the ``expect`` input events has one."""
    deadline = time.monotonic() + 90
    while True:
        recs = recommendations(cfg, expect=expect, timeout_s=30)
        if len({(r["source"]["partition"], r["source"]["offset"]) for r in recs}) >= expect:
            return recs
        assert time.monotonic() < deadline, "events without a recommendation:\n" + "\n".join(w.tail() for w in workers)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_frozen_inside_its_commit_is_fenced_when_it_resumes(
        kafka_cfg: Config, kafka_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deterministic zombie: the first worker applies a batch and is held inside its commit step (the pipeline's
    test fault-injection point), then frozen there (SIGSTOP: no heartbeats); the group hands both partitions to
    a second worker, which applies the same events and more and commits them; the first resumes and goes on with
    its commit. That commit is fenced (``lrustream_fenced_batches_total`` >= 1), the changelog never goes back
    to an older batch (every partition's applied markers only grow), a duplicated recommendation is the same
    answer twice (nothing applied on top of itself), and every state is what one clean pass gives."""
    overrides = [*kafka_overrides, "stream.session_timeout_s=6"]  # a frozen worker leaves the group in 6 s
    create_topics(kafka_cfg)
    publish_model(kafka_cfg, num_items=40)
    events = synthetic_events(4 * PHASE, users=30, seed=5)
    hold = tmp_path / "hold-commit"
    monkeypatch.setenv(HOLD_COMMIT_ENV, str(hold))
    old = WorkerProcess(overrides, tmp_path / "old.log").start()  # the only one that has the seam on
    monkeypatch.delenv(HOLD_COMMIT_ENV)
    new = WorkerProcess([*overrides, f"state.dir={tmp_path / 'new-owner'}"], tmp_path / "new.log")
    workers = (old, new)
    try:
        _wait("the first worker never owned both partitions", lambda: _owns(old, 2), workers)
        produce_events(kafka_cfg, events[:PHASE])
        _wait("the first worker did not commit the first events", lambda: _committed_all(old, PHASE), workers)

        hold.touch()
        produce_events(kafka_cfg, events[PHASE:2 * PHASE], ts0=EVENTS_TS0 + PHASE)
        _wait("the first worker never held a commit",
              lambda: "the commit waits while" in old.log_path.read_text(errors="replace"), workers)
        old.pause()
        hold.unlink()  # it goes on with the commit as soon as it is resumed

        new.start()
        _wait("the second worker never got both partitions", lambda: _owns(new, 2), workers)
        produce_events(kafka_cfg, events[2 * PHASE:3 * PHASE], ts0=EVENTS_TS0 + 2 * PHASE)
        _wait("the second worker did not commit the events", lambda: _committed_all(new, 2 * PHASE), workers)

        old.resume()
        _wait("the resumed worker's commit was not fenced",
              lambda: old.get_metric("lrustream_fenced_batches_total") >= 1, workers, timeout_s=60)
        produce_events(kafka_cfg, events[3 * PHASE:], ts0=EVENTS_TS0 + 3 * PHASE)
        recs = _served(kafka_cfg, 4 * PHASE, workers)
        _wait("a worker kept events uncommitted",
              lambda: all("batch_in_progress_s" not in w.health() for w in workers), workers)
        fenced = old.get_metric("lrustream_fenced_batches_total")
    finally:
        old.stop()
        new.stop()
    assert fenced >= 1, "the former owner's commit was fenced"
    for p in range(kafka_cfg.topics.partitions):
        markers = _markers(kafka_cfg, p)
        assert markers and markers == sorted(markers), f"partition {p}: the changelog went back: {markers}"
    answers: dict[tuple[int, int], list[str]] = {}
    for rec in recs:
        source = (rec["source"]["partition"], rec["source"]["offset"])
        assert answers.setdefault(source, rec["items"]) == rec["items"], f"event {source} answered twice, differently"

    inputs = _inputs(kafka_cfg, 4 * PHASE)
    clean = _processor(kafka_cfg, StateStore(tmp_path / "clean"))  # one pass, no fault, no changelog
    clean.process(inputs)
    restored = _processor(kafka_cfg, StateStore(tmp_path / "restored", _changelog(kafka_cfg)))
    for p in range(kafka_cfg.topics.partitions):
        restored.store.ensure_ready(p)
    assert _all_states(restored, inputs) == _all_states(clean, inputs), "every event applied exactly once"
    for processor in (clean, restored):
        processor.store.close()
