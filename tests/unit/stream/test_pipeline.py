"""The input loop's retry path (stream/pipeline.py) without a broker: a fake consumer and producer, a real
processor and local state store, faults injected in the commit (outputs not acknowledged, a partition fenced by
a rebalance) and in the store's RocksDB, where rocksdict raises them (a write on a full disk, a read of an
unreadable file). What is asserted: the back-off waits, ``lrustream_batch_retries_total``, /health degraded
while retrying and ok after, no event dead-lettered for a fault that is not its own, and every event since the
last commit applied again exactly once. A poison event is still dead-lettered, with no retry."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lrustream.kernel.config import load_config
from state.store import USER_PREFIX, Fenced, StateError
from stream.health import Liveness
from stream.pipeline import MAX_BACKOFF_S, Pipeline
from stream.processor import Input, Processor
from tests.streamkit import local_processor

USERS = 6  # user u<k> lives in partition k % 2


class FakeProducer:
    """Records what is produced; delivery reports come on flush, all failed for the next ``fail_flushes``
    flushes that have any (a broker that does not acknowledge the outputs)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.fail_flushes = 0
        self._reports: list[Callable[[Any, Any], None]] = []

    def produce(self, topic: str, value: bytes | None, key: bytes | None, headers: Any = None,
                timestamp: int = 0, on_delivery: Callable[[Any, Any], None] | None = None) -> None:
        self.records.append({"topic": topic, "key": key, "value": value, "headers": dict(headers or [])})
        if on_delivery is not None:
            self._reports.append(on_delivery)

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        reports, self._reports = self._reports, []
        failing = bool(reports) and self.fail_flushes > 0
        self.fail_flushes -= failing
        for on_delivery in reports:
            on_delivery("_TIMED_OUT: broker unreachable" if failing else None, None)
        return 0


class FakeConsumer:
    """The group's input consumer as the loop uses it between polls: offset commits and cached watermarks."""

    def __init__(self) -> None:
        self.committed: dict[int, int] = {}  # partition -> the next offset to read, as last committed

    def commit(self, offsets: list[Any], asynchronous: bool = True) -> None:
        self.committed.update({tp.partition: tp.offset for tp in offsets})

    def get_watermark_offsets(self, tp: Any, cached: bool = False) -> tuple[int, int]:
        return 0, 1000


class FailingRocksDB:
    """A partition's rocksdict database whose next ``reads`` reads of a user record and next ``writes`` writes
    fail as rocksdict fails them (a bare ``Exception`` with RocksDB's status); everything else reaches the real
    database."""

    def __init__(self, db: Any, reads: int = 0, writes: int = 0) -> None:
        self.db, self.reads, self.writes = db, reads, writes

    def get(self, key: bytes, *args: Any, **kwargs: Any) -> Any:
        if key.startswith(USER_PREFIX) and self.reads > 0:
            self.reads -= 1
            raise Exception("IO error: While pread offset 4096 len 4096: 000012.sst: Input/output error")
        return self.db.get(key, *args, **kwargs)

    def write(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        if self.writes > 0:
            self.writes -= 1
            raise Exception("IO error: No space left on device: While appending to file: 000009.log")
        return self.db.write(batch, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def _events(first: int, last: int) -> list[Input]:
    """Events first..last-1 of the stream: event k is user u<k % USERS>'s; each partition numbers its own."""
    out = []
    for k in range(first, last):
        user, p = f"u{k % USERS}", k % USERS % 2
        value = json.dumps({"user_id": user, "item_id": f"i{1 + k * 7 % 40}", "ts": 1000 + k}).encode()
        out.append(Input(p, k // 2, user.encode(), value, 1000 + k))
    return out


def _processor(tmp_path: Path, name: str, producer: FakeProducer) -> Processor:
    return local_processor(tmp_path, producer, name)[0]


class Loop:
    """A pipeline around a real processor, its consumer faked and its back-off recorded (not slept): each wait
    is kept with what /health said during it."""

    def __init__(self, tmp_path: Path) -> None:
        self.producer = FakeProducer()
        self.processor = _processor(tmp_path, "state", self.producer)
        cfg = load_config(overrides=[f"model_store.dir={tmp_path / 'models'}"])
        self.liveness = Liveness()
        self.pipeline = Pipeline(cfg, self.processor, self.processor.store, self.processor.metrics, self.liveness)
        self.consumer = self.pipeline._consumer = FakeConsumer()
        self.waits: list[tuple[float, str]] = []
        self.pipeline.sleep = lambda s: self.waits.append((s, self.liveness.report(None)[0]))

    def run(self, *batches: list[Input]) -> None:
        """The loop's turns for ``batches`` (applied one by one), then its commit step."""
        for batch in batches:
            self.pipeline._apply(batch)
        self.pipeline._commit()

    def retries(self) -> float | None:
        return self.processor.metrics.registry.get_sample_value("lrustream_batch_retries_total")

    def dead_letters(self) -> list[tuple[int, int, str]]:
        """(partition, offset, reason) of each dead letter produced."""
        dead = [r["headers"] for r in self.producer.records if r["topic"] == self.processor.topics.dlq]
        return [(int(h["lrustream.source.partition"]), int(h["lrustream.source.offset"]),
                 h["lrustream.reason"].decode()) for h in dead]

    def served(self) -> Counter[tuple[int, int]]:
        """How many recommendations each input event (partition, offset) got."""
        recs = [json.loads(r["value"]) for r in self.producer.records
                if r["topic"] == self.processor.topics.recommendations]
        return Counter((r["source"]["partition"], r["source"]["offset"]) for r in recs)


def _states(processor: Processor) -> dict[str, tuple[bytes, int, list[int]]]:
    out = {}
    for k in range(USERS):
        record = processor.store.get(k % 2, f"u{k}")
        assert record is not None, f"u{k}"
        out[f"u{k}"] = (record.state, record.offset, [int(i) for i in record.window])
    return out


def _clean(tmp_path: Path, events: list[Input]) -> dict[str, tuple[bytes, int, list[int]]]:
    """Every user's state after ``events`` applied once each, with no fault."""
    processor = _processor(tmp_path, "clean", FakeProducer())
    processor.process(events)
    return _states(processor)


def _assert_backoff(waits: list[tuple[float, str]], failures: int) -> None:
    """One jittered wait (x0.5..1.5) per failure, from 0.2 s doubling up to MAX_BACKOFF_S, never past
    MAX_BACKOFF_S (the jitter stays below the bound), each while /health said degraded."""
    assert len(waits) == failures, waits
    for k, (wait_s, status) in enumerate(waits):
        base = min(0.2 * 2 ** k, MAX_BACKOFF_S)
        assert 0.5 * base <= wait_s <= min(1.5 * base, MAX_BACKOFF_S), (k, wait_s)
        assert status == "degraded", (k, status)


def _assert_recovered_from_two_failures(loop: Loop, tmp_path: Path) -> None:
    """After two failed tries of events 12..41 (events 0..11 committed before): two back-off waits, two retries
    counted, /health ok again, every event committed, nothing pending, states equal to a clean run's."""
    _assert_backoff(loop.waits, 2)
    assert loop.retries() == 2
    assert loop.liveness.report(None) == ("ok", None) and loop.liveness.busy_since is None
    assert loop.consumer.committed == {0: 21, 1: 21} and loop.pipeline._uncommitted == []
    assert not loop.processor.pending
    assert _states(loop.processor) == _clean(tmp_path, _events(0, 42))


def test_a_commit_that_fails_twice_is_retried_with_backoff_and_applies_every_uncommitted_event_once(
        tmp_path: Path) -> None:
    """Three batches applied since the last commit, whose commit fails twice (outputs not acknowledged): two
    back-off waits (/health degraded during each), ``lrustream_batch_retries_total`` 2, /health ok after, the
    consumer's offsets committed past the last event, and the states those of every event applied exactly once
    (the committed events are not applied again, none of the uncommitted ones is missing or doubled)."""
    loop = Loop(tmp_path)
    loop.run(_events(0, 12))  # committed: the retries start from these states
    assert loop.consumer.committed == {0: 6, 1: 6} and loop.waits == []
    loop.producer.fail_flushes = 2
    loop.run(_events(12, 20), _events(20, 30), _events(30, 42))
    _assert_recovered_from_two_failures(loop, tmp_path)
    served = loop.served()  # each uncommitted event served by the first try and by each of the two retries
    assert served == {**{(i.partition, i.offset): 1 for i in _events(0, 12)},
                      **{(i.partition, i.offset): 3 for i in _events(12, 42)}}


def test_a_state_store_write_that_fails_twice_behaves_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """The fault in the state layer: partition 1's RocksDB write fails twice (a full disk) after partition 0's
    succeeded. Same back-off, counter and /health; partition 0's events, committed by the first try, are not
    applied again by the retries (their markers), partition 1's are, once per try, and every state ends as if
    each event had been applied once."""
    loop = Loop(tmp_path)
    loop.run(_events(0, 12))
    part = loop.processor.store.partition(1)
    monkeypatch.setattr(part, "db", FailingRocksDB(part.db, writes=2))  # a full disk
    loop.run(_events(12, 20), _events(20, 30), _events(30, 42))
    _assert_backoff(loop.waits, 2)
    assert loop.retries() == 2 and loop.dead_letters() == []
    assert loop.liveness.report(None) == ("ok", None)
    assert loop.consumer.committed == {0: 21, 1: 21} and not loop.processor.pending
    assert _states(loop.processor) == _clean(tmp_path, _events(0, 42))
    uncommitted = _events(12, 42)
    assert loop.served() == {**{(i.partition, i.offset): 1 for i in _events(0, 12)},
                             **{(i.partition, i.offset): 1 for i in uncommitted if i.partition == 0},
                             **{(i.partition, i.offset): 3 for i in uncommitted if i.partition == 1}}


def test_a_state_store_read_that_fails_twice_dead_letters_nothing_and_is_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault in the state layer's read: partition 1's RocksDB fails to read a user's record twice (an
    unreadable file), the way rocksdict fails (a bare ``Exception``, as a bug in the model work would raise). It is
    the store's fault, not the events': none is dead-lettered, the batch is retried with the same back-off,
    counter and /health as a failed commit, and every event is served once (the failed tries emitted nothing)
    and applied once."""
    loop = Loop(tmp_path)
    loop.run(_events(0, 12))
    part = loop.processor.store.partition(1)
    monkeypatch.setattr(part, "db", FailingRocksDB(part.db, reads=2))
    loop.run(_events(12, 20), _events(20, 30), _events(30, 42))
    assert loop.dead_letters() == []
    _assert_recovered_from_two_failures(loop, tmp_path)
    assert loop.served() == {(i.partition, i.offset): 1 for i in _events(0, 42)}


def test_a_poison_event_is_still_dead_lettered_and_nothing_is_retried(tmp_path: Path) -> None:
    """An event whose model work raises a bare ``Exception`` (the type rocksdict raises, here the event's own
    fault) costs only itself: dead-lettered ("processing failed"), no retry, no wait, /health ok, the other
    events served once and applied as if it had never come."""
    loop = Loop(tmp_path)
    model, steps = loop.processor.serving.model, loop.processor.serving.model.steps
    poison = loop.processor.serving.vocab.get("i5")  # event 12's item, and only its

    def poisoned_steps(state: Any, items: torch.Tensor) -> Any:
        if (items == poison).any():
            raise Exception("poison")
        return steps(state, items)

    model.steps = poisoned_steps
    events = _events(0, 42)
    loop.run(events[:20], events[20:])
    assert loop.dead_letters() == [(0, 6, "processing failed: Exception: poison")]
    assert loop.waits == [] and not loop.retries()
    assert loop.liveness.report(None) == ("ok", None)
    assert loop.consumer.committed == {0: 21, 1: 21}
    model.steps = steps
    assert _states(loop.processor) == _clean(tmp_path, events[:12] + events[13:])
    assert loop.served() == {(i.partition, i.offset): 1 for i in events if i.offset != 6 or i.partition != 0}


def test_a_fenced_commit_is_retried_counted_and_reported(tmp_path: Path) -> None:
    """The commit refused twice because another worker claimed a partition since (``Fenced``, a rebalance in
    progress): retried like any failed commit, each retry counted in ``lrustream_batch_retries_total`` (and the
    refusals in ``lrustream_fenced_batches_total``), /health degraded with the reason while it retries and ok
    after, every event applied once."""
    loop = Loop(tmp_path)
    loop.run(_events(0, 12))
    store, commit, failures = loop.processor.store, loop.processor.store.commit, [2]

    def fenced(batches: Any) -> None:
        if failures[0] > 0:
            failures[0] -= 1
            raise Fenced("changelog: another worker has claimed partition(s) [1] since this one did")
        commit(batches)

    store.commit = fenced  # type: ignore[method-assign]
    reasons: list[str | None] = []
    record = loop.pipeline.sleep

    def wait(s: float) -> None:
        reasons.append(loop.liveness.report(None)[1])
        record(s)

    loop.pipeline.sleep = wait
    loop.run(_events(12, 20), _events(20, 30))
    _assert_backoff(loop.waits, 2)
    assert all(r is not None and "Fenced" in r and "claimed" in r for r in reasons), reasons
    assert loop.retries() == 2
    assert loop.processor.metrics.registry.get_sample_value("lrustream_fenced_batches_total") == 2
    assert loop.liveness.report(None) == ("ok", None) and loop.liveness.busy_since is None
    assert loop.consumer.committed == {0: 15, 1: 15} and not loop.processor.pending
    assert _states(loop.processor) == _clean(tmp_path, _events(0, 30))


def test_an_apply_that_fails_is_retried_with_everything_since_the_last_commit(tmp_path: Path) -> None:
    """A batch whose apply raises (its partition cannot be restored: the changelog unreachable for a moment)
    after two batches applied without a commit: the retry applies all three batches again from the committed
    states, exactly once each."""
    loop = Loop(tmp_path)
    loop.run(_events(0, 12))
    loop.pipeline._apply(_events(12, 20))
    loop.pipeline._apply(_events(20, 30))
    ensure_ready, failures = loop.processor.store.ensure_ready, [1]

    def unreachable(p: int) -> int:
        if failures[0] > 0:
            failures[0] -= 1
            raise StateError("changelog not acknowledged: broker unreachable")
        return ensure_ready(p)

    loop.processor.store.ensure_ready = unreachable  # type: ignore[method-assign]
    loop.pipeline._apply(_events(30, 42))  # fails, and is retried with 12..41 (committed at once)
    _assert_backoff(loop.waits, 1)
    assert loop.retries() == 1 and loop.liveness.report(None) == ("ok", None)
    assert loop.consumer.committed == {0: 21, 1: 21} and loop.pipeline._uncommitted == []
    assert _states(loop.processor) == _clean(tmp_path, _events(0, 42))
    assert loop.served() == {**{(i.partition, i.offset): 1 for i in _events(0, 12)},
                             **{(i.partition, i.offset): 2 for i in _events(12, 30)},
                             **{(i.partition, i.offset): 1 for i in _events(30, 42)}}


@pytest.mark.parametrize("jitter", ["random", "lowest", "highest"])
def test_the_backoff_doubles_up_to_its_bound_while_the_commit_keeps_failing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jitter: str) -> None:
    """Eight failures in a row: waits of 0.2, 0.4, ... s (jittered), never past the bound, one retry counted per
    failure; the ninth try commits. The jitter's extremes are drawn on purpose: even the highest draw at the
    bound waits MAX_BACKOFF_S at most."""
    if jitter != "random":
        monkeypatch.setattr(random, "uniform", lambda a, b: a if jitter == "lowest" else b)
    loop = Loop(tmp_path)
    loop.producer.fail_flushes = 8
    loop.run(_events(0, 12))
    _assert_backoff(loop.waits, 8)
    assert max(wait_s for wait_s, _ in loop.waits) <= MAX_BACKOFF_S
    assert loop.retries() == 8 and loop.liveness.report(None) == ("ok", None)
    assert _states(loop.processor) == _clean(tmp_path, _events(0, 12))


def test_a_stopping_worker_gives_up_the_retries_and_commits_nothing(tmp_path: Path) -> None:
    """A stop requested while the commit fails: no further try, nothing committed (neither states nor offsets),
    nothing left pending; the events are redelivered to the partitions' next owner."""
    loop = Loop(tmp_path)
    loop.run(_events(0, 12))
    loop.producer.fail_flushes = 5
    loop.pipeline.sleep = lambda s: loop.pipeline.request_stop()
    loop.run(_events(12, 20))
    assert loop.retries() == 1 and loop.pipeline._uncommitted == [] and not loop.processor.pending
    assert loop.consumer.committed == {0: 6, 1: 6}
    assert _states(loop.processor) == _clean(tmp_path, _events(0, 12))
