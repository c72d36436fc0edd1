"""Gaps a test audit found in the model-versions topic (stream/versions.py), on the real broker:

- a poisoned record (a chunk key naming a negative offset, an offset no file has, an over-long or path-ish upload;
  a pointer whose value is no JSON object) costs only itself: it is counted and logged, and the records around
  it, ``done`` and ``@current`` included, still apply, in a running worker, a worker started afterwards and any
  reader; gc tombstones a record whose key is malformed;
- two publishers racing for one version number: exactly one upload wins on every host, bit for bit and verified,
  never a mix of both; the other is refused with a message that says so (a ``publish`` takes the next number);
- topic gc spares the pinned and the shadowed version even when they are neither the newest nor @current: their
  chunks stay on the topic, so a host that starts after gc still loads them from the topic alone.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from typer.testing import CliRunner

import stream.versions
from lrustream.cli import app
from lrustream.kernel.config import Config, load_config
from lrustream.kernel.kafka import librdkafka_config
from models.store import META, VOCAB, WEIGHTS, ModelStore
from stream.topics import create_topics
from stream.versions import POINTERS, VersionConflict, VersionLog
from tests.streamkit import WorkerProcess, publish_model, small_model, upload_raw, version_files, wait_for_version

FILES = (META, VOCAB, WEIGHTS)
POISONS = {  # records a reader must skip: chunks under the number the valid upload that follows uses, a pointer
    "negative offset": (b"v000002/bad0/weights.safetensors/-1", b"poison"),
    "offset past any file": (b"v000002/bad1/weights.safetensors/" + str(1 << 62).encode(), b"poison"),
    "over-long upload": (b"v000002/" + b"x" * 300 + b"/meta.json/0", b"poison"),
    "path-ish upload": (b"v000002/../meta.json/0", b"poison"),
    "pointer not an object": (b"@current", b"[]"),
}


def _host(overrides: list[str], tmp_path: Path, name: str) -> list[str]:
    """``overrides`` for a host of its own: nothing shared with the others but the broker."""
    return [*overrides, f"state.dir={tmp_path / name / 'state'}", f"model_store.dir={tmp_path / name / 'models'}"]


def _reader(overrides: list[str], tmp_path: Path, name: str) -> VersionLog:
    cfg = load_config(overrides=_host(overrides, tmp_path, name))
    return VersionLog(cfg, ModelStore(cfg.model_store.dir), who=name)


def _topic(cfg: Config) -> list[tuple[str, bytes | None]]:
    """Every record of the model-versions topic, oldest first, as (key, value)."""
    consumer = Consumer(librdkafka_config(cfg, **{"group.id": "audit", "enable.auto.commit": False}))
    tp = TopicPartition(cfg.topics.model_versions, 0, 0)
    try:
        _, end = consumer.get_watermark_offsets(tp, timeout=10)
        consumer.assign([tp])
        out: list[tuple[str, bytes | None]] = []
        deadline = time.monotonic() + 30
        while len(out) < end and time.monotonic() < deadline:
            out += [(m.key().decode(errors="replace"), m.value()) for m in consumer.consume(500, 1.0) if not m.error()]
        return out
    finally:
        consumer.close()


def _bytes(store: ModelStore, version: str) -> dict[str, bytes]:
    folder = store.versions_dir / version
    return {name: (folder / name).read_bytes() for name in FILES}


def _workers(overrides: list[str], tmp_path: Path, names: list[str]) -> Iterator[WorkerProcess]:
    for name in names:
        yield WorkerProcess(_host(overrides, tmp_path, name), tmp_path / f"{name}.log").start()


# ----- 1. a poisoned record costs only itself -----------------------------------------------------------------------
def _poisoned_then_valid(cfg: Config, scratch: Path, poisons: list[tuple[bytes, bytes]]) -> dict[str, bytes]:
    """``poisons`` then a valid v000002 and its ``@current``, produced by a raw producer in one go (so that a reader
    takes them in one batch); returns v000002's files."""
    files = version_files(cfg, "v000002", scratch, seed=7)
    upload_raw(cfg, "v000002", files, alter=lambda chunks: [*poisons, *chunks])
    return files


@pytest.mark.parametrize("poison", sorted(POISONS))
def test_a_poisoned_record_is_counted_and_skipped_and_its_neighbours_still_apply(
        kafka_cfg: Config, kafka_overrides: list[str], tmp_path: Path, poison: str) -> None:
    """One poisoned record, then a valid version in the same batch: a reader reading both installs and
    serves the valid version, counts the poisoned record once, and writes nothing outside its scratch folder."""
    create_topics(kafka_cfg)
    v1 = publish_model(kafka_cfg)
    reader = _reader(kafka_overrides, tmp_path, "reader")
    try:
        reader.catch_up()
        assert reader.store.current() == v1
        files = _poisoned_then_valid(kafka_cfg, tmp_path / "scratch", [POISONS[poison]])
        reader.catch_up()
        assert reader.bad_records == 1, "the poisoned record is counted"
        assert reader.store.current() == "v000002" and _bytes(reader.store, "v000002") == files
        reader.store.load("v000002")  # verifies
        assert not (tmp_path / "reader" / "models" / "meta.json").exists(), "nothing written outside scratch"
        reader.gc(keep=5)
        assert not reader.malformed
    finally:
        reader.close()
    key = POISONS[poison][0].decode()
    if key not in POINTERS:  # a malformed key is tombstoned; a pointer's bad value is overwritten by the next
        assert reader.strays_removed == 1 and dict(_topic(kafka_cfg))[key] is None, "gc tombstoned the poison"
    assert sorted(p.name for p in (tmp_path / "reader" / "models" / "versions").iterdir()) == [v1, "v000002"]


def test_poisoned_records_never_cost_a_running_or_a_late_worker_the_version_after_them(
        kafka_cfg: Config, kafka_overrides: list[str], tmp_path: Path) -> None:
    """Every kind of poisoned record, then a valid version, in one batch: a worker that was serving v1 and a
    worker started afterwards both serve the valid version, and each logs the poisoned records instead of
    crashing or dropping the rest of the batch."""
    create_topics(kafka_cfg)
    v1 = publish_model(kafka_cfg)
    running = next(_workers(kafka_overrides, tmp_path, ["running"]))
    workers = [running]
    try:
        assert running.wait_healthy()["model_version"] == v1
        files = _poisoned_then_valid(kafka_cfg, tmp_path / "scratch", list(POISONS.values()))
        workers += _workers(kafka_overrides, tmp_path, ["late"])
        served = {name: _served_within(worker, "v000002", 45)
                  for name, worker in zip(("running", "late"), workers, strict=True)}
        assert served == {"running": "v000002", "late": "v000002"}, [w.tail() for w in workers]
        for worker in workers:
            assert worker.proc is not None and worker.proc.poll() is None, worker.tail()
            assert worker.log_path.read_text().count("ignoring record") >= len(POISONS), worker.tail()
            assert worker.get_metric("lrustream_model_version_records_ignored") >= len(POISONS)
    finally:
        for worker in workers:
            worker.stop()
    for name in ("running", "late"):
        assert _bytes(ModelStore(tmp_path / name / "models"), "v000002") == files, name


def _served_within(worker: WorkerProcess, version: str, timeout_s: float) -> str | None:
    """The version ``worker`` serves once it is ``version``, or when ``timeout_s`` ran out."""
    deadline = time.monotonic() + timeout_s
    served = None
    while time.monotonic() < deadline:
        try:
            served = json.loads(worker.get("/model"))["version"]
        except OSError:  # not answering yet
            served = None
        if served == version:
            break
        time.sleep(0.2)
    return served


# ----- 2. racing publishers of one version number -------------------------------------------------------------------
def _in_step(monkeypatch: pytest.MonkeyPatch, parties: int) -> None:
    """The first ``parties`` calls of ``VersionLog._upload`` wait for each other: publishers that read the topic
    and chose their number before any of them uploaded, i.e. racing for the same number."""
    barrier = threading.Barrier(parties, timeout=30)
    upload = VersionLog._upload
    calls = iter(range(parties))  # the first ``parties`` uploads wait; a retry under the next number, or any
    lock = threading.Lock()       # later upload, does not

    def in_step(self: VersionLog, *args: Any) -> None:
        with lock:
            racing = next(calls, None) is not None
        if racing:
            barrier.wait()
        upload(self, *args)

    monkeypatch.setattr(VersionLog, "_upload", in_step)
    monkeypatch.setattr(stream.versions, "CHUNK_BYTES", 1024)  # many chunks each: the two uploads interleave


def _race(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` in threads at once; each one's return value or exception."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:  # the test looks at it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def _local_version(store: ModelStore, cfg: Config, version: str, seed: int) -> dict[str, bytes]:
    """A version trained offline into ``store`` alone (never on the topic) under number ``version``."""
    folder, _ = store.prepare(*small_model(cfg, seed=seed), version)
    store.install(folder, version)
    return _bytes(store, version)


def _uploads_of(cfg: Config, version: str) -> set[str]:
    """The uploads of ``version`` with records on the topic (the last record of a key tombstoned: none)."""
    latest = dict(_topic(cfg))
    return {key.split("/")[1] for key, value in latest.items() if key.startswith(f"{version}/") and value is not None}


def test_two_pushes_racing_for_one_number_one_wins_on_every_host_and_the_other_is_refused(
        kafka_cfg: Config, kafka_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two hosts push different weights under the same number v000002 at once. Exactly one push succeeds; the
    other raises VersionConflict saying the number was taken. A running worker, a worker started afterwards and
    both pushers' readers (a late one on the losing host included) agree on the winner: the others hold its
    bytes, verified, and no host (the loser's neither) treats its own upload as v000002. gc run on the losing
    host (which refused the winner: its store holds another v000002) removes the losing upload alone."""
    create_topics(kafka_cfg)
    v1 = publish_model(kafka_cfg)
    running = next(_workers(kafka_overrides, tmp_path, ["running"]))
    workers = [running]
    hosts = [_reader(kafka_overrides, tmp_path, name) for name in ("a", "b")]
    try:
        assert running.wait_healthy()["model_version"] == v1
        sent = [_local_version(log.store, kafka_cfg, "v000002", seed=10 + i) for i, log in enumerate(hosts)]
        _in_step(monkeypatch, 2)
        results = _race([lambda log=log: log.push("v000002") for log in hosts])
        assert len(_uploads_of(kafka_cfg, "v000002")) == 2, "both uploads reached the topic"
        won = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
        assert len(won) == 1, f"exactly one push wins: {results}"
        winner, loser = won[0], 1 - won[0]
        assert isinstance(results[loser], VersionConflict), results[loser]
        assert "v000002 was not taken" in str(results[loser]) and "first" in str(results[loser])
        first = hosts[winner].seen.done["v000002"].upload
        assert first in _uploads_of(kafka_cfg, "v000002")
        assert "v000002" not in hosts[loser].seen.done, "the losing host never takes its own upload as v000002"
        wait_for_version(running, "v000002")
        workers += _workers(kafka_overrides, tmp_path, ["late"])
        assert workers[1].wait_healthy(45)["model_version"] == "v000002", workers[1].tail()
    finally:
        for worker in workers:
            worker.stop()
        for log in hosts:
            log.close()
    for name in ("running", "late"):
        store = ModelStore(tmp_path / name / "models")
        assert _bytes(store, "v000002") == sent[winner], name
        store.load("v000002")  # its checksums verify
    publish_model(kafka_cfg, seed=30)  # v000003: a newer version, after which gc takes silent uploads for dead
    monkeypatch.setattr(stream.versions, "STRAY_AGE_S", 0.0)
    again = _reader(kafka_overrides, tmp_path, "ab"[loser])  # the losing host, reading the topic afresh
    try:
        again.catch_up()
        assert "v000002" not in again.seen.done and "holds another v000002" in again.seen.refused["v000002"]
        again.gc(keep=5)  # removes the losing upload, never the winning one, though this host refused it
    finally:
        again.close()
    latest = dict(_topic(kafka_cfg))
    tombstoned = {key.split("/")[1] for key, value in latest.items() if key.startswith("v000002/") and value is None}
    assert tombstoned and first not in tombstoned, "gc on the losing host removed the losing upload alone"
    assert _uploads_of(kafka_cfg, "v000002") == {first}
    fresh = _reader(kafka_overrides, tmp_path, "fresh")
    try:
        fresh.catch_up()
        assert _bytes(fresh.store, "v000002") == sent[winner] and fresh.seen.done["v000002"].upload == first
    finally:
        fresh.close()


def test_two_publishers_racing_for_one_number_one_takes_it_everywhere_the_other_the_next(
        kafka_cfg: Config, kafka_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two trainers publish different weights having both chosen v000002: one upload takes v000002 on every host
    (the other publisher's included), the other publisher publishes again as v000003; a host that starts
    afterwards holds each version bit for bit as its publisher wrote it, never a mix of the two uploads."""
    create_topics(kafka_cfg)
    publish_model(kafka_cfg)
    hosts = [_reader(kafka_overrides, tmp_path, name) for name in ("a", "b")]
    try:
        for log in hosts:
            log.catch_up()
        _in_step(monkeypatch, 2)
        results = _race([lambda log=log, i=i: log.publish(*small_model(kafka_cfg, seed=20 + i))
                         for i, log in enumerate(hosts)])
        assert sorted(info.version for info in results) == ["v000002", "v000003"], results
        assert len(_uploads_of(kafka_cfg, "v000002")) == 2, "both uploaded v000002"
        for log in hosts:
            log.catch_up()
        owner = {info.version: i for i, info in enumerate(results)}
        published = {v: _bytes(hosts[i].store, v) for v, i in owner.items()}
        assert published["v000002"] != published["v000003"]
        assert {log.seen.done["v000002"].upload for log in hosts} == {hosts[0].seen.done["v000002"].upload}
    finally:
        for log in hosts:
            log.close()
    late = _reader(kafka_overrides, tmp_path, "late")
    try:
        late.catch_up()
        for log in (late, *(_reader(kafka_overrides, tmp_path, n) for n in ("a", "b"))):
            for version, files in published.items():
                assert _bytes(log.store, version) == files, (log.who, version)
                log.store.load(version)  # its checksums verify
            if log is not late:
                log.close()
    finally:
        late.close()


# ----- 3. topic gc spares the pinned and the shadowed version --------------------------------------------------------
def test_topic_gc_spares_a_pinned_and_a_shadowed_version_that_are_neither_newest_nor_current(
        kafka_cfg: Config, kafka_overrides: list[str], tmp_path: Path) -> None:
    """v1 pinned, then v2..v4 published (stored, not served), v2 shadowed: ``models gc --keep 1`` removes v3
    alone. v1's and v2's weights chunks are still on the topic (nothing tombstoned them), so a host that starts
    after gc, with an empty store, loads both from the topic: its worker serves v1 and shadow-scores v2."""
    create_topics(kafka_cfg)
    ops = _host(kafka_overrides, tmp_path, "ops")
    cli = CliRunner()
    v1 = publish_model(kafka_cfg, seed=1)
    assert cli.invoke(app, ["models", "pin", v1, *ops]).exit_code == 0
    v2, v3, v4 = (publish_model(kafka_cfg, seed=seed) for seed in (2, 3, 4))
    assert cli.invoke(app, ["models", "shadow", v2, *ops]).exit_code == 0
    out = cli.invoke(app, ["models", "gc", "--keep", "1", *ops])
    assert out.exit_code == 0, out.output
    chunks = {key: value for key, value in _topic(kafka_cfg) if f"/{WEIGHTS}/" in key}
    for version in (v1, v2, v4):
        assert [key for key, value in chunks.items() if key.startswith(version) and value is None] == [], version
    assert all(value is None for key, value in chunks.items() if key.startswith(v3)), "v3's chunks are tombstoned"
    assert f"removed the weights of 1 versions: {v3}" in out.output, out.output
    late = _reader(kafka_overrides, tmp_path, "late-reader")
    try:
        late.catch_up()
        assert late.store.collected(v3) and not late.store.collected(v1) and not late.store.collected(v2)
        for version in (v1, v2, v4):
            late.store.load(version)  # whole and verified, from the topic alone
        assert (late.store.current(), late.store.pinned(), late.store.shadow()) == (v1, v1, v2)
    finally:
        late.close()
    worker = next(_workers(kafka_overrides, tmp_path, ["late-worker"]))
    try:
        assert worker.wait_healthy()["model_version"] == v1
        deadline = time.monotonic() + 30
        while (model := json.loads(worker.get("/model")))["shadow"] != v2:
            assert time.monotonic() < deadline, (model, worker.tail())
            time.sleep(0.2)
    finally:
        worker.stop()
