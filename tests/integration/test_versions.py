"""Model versions through Kafka (stream/versions.py) on the real broker: hosts that share nothing but
the broker serve the trainer's versions, a late worker catches up, a rollback reaches every worker; a worker
started before any version waits; a version over the broker's record limit round-trips bit for bit; a publish
killed half-way leaves only complete versions visible."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from confluent_kafka import Consumer, TopicPartition
from typer.testing import CliRunner

import stream.versions
from lrustream.cli import app
from lrustream.kernel.config import Config, load_config
from lrustream.kernel.kafka import librdkafka_config
from models.store import META, VOCAB, WEIGHTS, ModelStore
from stream.topics import create_topics
from stream.versions import CHUNK_BYTES, VersionLog
from tests.streamkit import (
    REPO,
    WorkerProcess,
    produce_events,
    publish_model,
    recommendations,
    ring_stream,
    small_model,
    wait_for_version,
)
from trainer.online import TrainerLoop

BROKER_RECORD_LIMIT = 1_048_588  # Kafka's default message.max.bytes, which the test broker keeps


def test_versions_reach_every_worker_with_nothing_shared_but_the_broker(kafka_overrides: list[str],
                                                                        tmp_path: Path) -> None:
    common = [*kafka_overrides, "online.every_seconds=3600", "online.every_events=1000000", "stream.unknown_items=oov",
              "online.min_holdout=30", "online.min_steps=30", "online.lr=0.005", "model.max_len=20",
              "online.http_port=0"]

    def host(name: str) -> list[str]:  # each host its own state and model store
        return [*common, f"state.dir={tmp_path / name / 'state'}", f"model_store.dir={tmp_path / name / 'models'}"]

    ops = load_config(overrides=host("ops"))
    create_topics(ops)
    v1 = publish_model(ops)
    events = ring_stream(30, 600)
    produce_events(ops, events)
    workers = [WorkerProcess(host(f"worker{i}"), tmp_path / f"worker{i}.log").start() for i in (1, 2)]
    trainer = TrainerLoop(load_config(overrides=host("trainer")), log_line=print)
    try:
        for worker in workers:
            assert worker.wait_healthy()["model_version"] == v1
        recommendations(ops, expect=len(events))
        deadline = time.monotonic() + 60
        while trainer.buffer.seen < len(events) and time.monotonic() < deadline:
            trainer.poll()
        trainer.requested = True
        result = trainer.round()
        assert result.published, result.line()
        for worker in workers:
            wait_for_version(worker, result.published)
        late = WorkerProcess(host("worker3"), tmp_path / "worker3.log").start()
        workers.append(late)
        assert late.wait_healthy()["model_version"] == result.published, "a late worker serves what the others do"

        out = CliRunner().invoke(app, ["models", "rollback", v1, *host("ops")])
        assert out.exit_code == 0, out.output
        for worker in workers:
            wait_for_version(worker, v1)
        trainer.poll()
        assert trainer.store.current() == v1, "the trainer's cache follows the rollback too"
        produce_events(ops, events[:40], ts0=1_900_000_000_000)
        recs = recommendations(ops, expect=len(events) + 40)
    finally:
        trainer.close()
        for worker in workers:
            worker.stop()
    assert {r["model_version"] for r in recs if r["event_ts"] >= 1_900_000_000_000} == {v1}
    published = tmp_path / "trainer" / "models" / "versions" / result.published
    for name in ("worker1", "worker2", "worker3"):
        copy = tmp_path / name / "models" / "versions" / result.published
        assert all((copy / f).read_bytes() == (published / f).read_bytes() for f in (META, VOCAB, WEIGHTS)), name


def test_a_worker_started_before_any_version_waits_then_serves(kafka_cfg: Config, kafka_overrides: list[str],
                                                               tmp_path: Path) -> None:
    create_topics(kafka_cfg)
    events = ring_stream(10, 60)
    produce_events(kafka_cfg, events)
    worker = WorkerProcess(kafka_overrides, tmp_path / "worker.log").start()
    try:
        deadline = time.monotonic() + 60
        while (health := _health_or_none(worker)) is None or health["status"] != "waiting":
            assert time.monotonic() < deadline and worker.proc and worker.proc.poll() is None, worker.tail()
            time.sleep(0.3)
        assert "waiting for a model" in health["reason"] and health["model_version"] is None
        time.sleep(3)
        assert worker.proc.poll() is None and worker.health()["status"] == "waiting", "it waits, it does not exit"
        v1 = publish_model(kafka_cfg)
        assert worker.wait_healthy()["model_version"] == v1
        recs = recommendations(kafka_cfg, expect=len(events))
    finally:
        worker.stop()
    assert len(recs) == len(events) and {r["model_version"] for r in recs} == {v1}


def _health_or_none(worker: WorkerProcess) -> dict | None:
    try:
        return worker.health()
    except OSError:  # not listening yet
        return None


def test_a_version_over_the_record_limit_round_trips_bit_for_bit(kafka_cfg: Config, tmp_path: Path) -> None:
    create_topics(kafka_cfg)
    model, vocab = small_model(kafka_cfg, num_items=57_000, d_model=64)
    publisher = VersionLog(kafka_cfg, ModelStore(tmp_path / "publisher"))
    reader = VersionLog(kafka_cfg, ModelStore(tmp_path / "reader"))
    try:
        t0 = time.monotonic()
        info = publisher.publish(model, vocab)
        t1 = time.monotonic()
        reader.catch_up()
        print(f"\n57,000 items x 64: published in {t1 - t0:.2f} s, read by another host in "
              f"{time.monotonic() - t1:.2f} s")
        sent, got = publisher.store.versions_dir / info.version, reader.store.versions_dir / info.version
        assert (sent / WEIGHTS).stat().st_size > 10 * BROKER_RECORD_LIMIT
        for name in (META, VOCAB, WEIGHTS):
            assert (got / name).read_bytes() == (sent / name).read_bytes(), name
        loaded = reader.store.load(info.version)
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[name], tensor), name
        assert reader.store.current() == info.version and loaded.vocab.items() == vocab.items()
    finally:
        publisher.close()
        reader.close()


DOOMED = """
import sys
from lrustream.kernel.config import load_config
from stream.versions import publish_version
from tests.streamkit import small_model
cfg = load_config(overrides=sys.argv[1:])
for seed in range(1000):
    publish_version(cfg, *small_model(cfg, num_items=57_000, seed=seed, d_model=64), who="doomed")
"""


def test_a_publish_killed_half_way_leaves_only_complete_versions_visible_and_gc_removes_it(
        kafka_cfg: Config, kafka_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    create_topics(kafka_cfg)
    v1 = publish_model(kafka_cfg)
    cut: set[str] = set()
    for attempt in range(5):  # a kill can land between two publishes; try again until one lands inside one
        start = len(_topic_keys(kafka_cfg))
        proc = subprocess.Popen([sys.executable, "-c", DOOMED, *kafka_overrides,
                                 f"model_store.dir={tmp_path / f'doomed{attempt}'}"], cwd=REPO)
        try:
            _wait_for_chunks_without_done(kafka_cfg, start, at_least=3)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        cut = _uploads_without_done(kafka_cfg)
        if cut:
            break
    assert cut, "no kill landed inside a publish"
    reader = VersionLog(kafka_cfg, ModelStore(tmp_path / "reader"))
    try:
        reader.catch_up()
        whole = sorted(reader.seen.done)
        assert v1 in whole and not cut & set(whole), (cut, whole)
        assert reader.store.versions() == whole, "only complete versions are installed"
        for version in whole:
            reader.store.load(version)  # each one verifies
        listed = CliRunner().invoke(app, ["models", "list", *kafka_overrides]).output
        assert not any(version in listed for version in cut), listed
    finally:
        reader.close()
    after = publish_model(kafka_cfg, seed=9)
    assert after > max(cut), "a number a dead publish used is never reused"
    monkeypatch.setattr(stream.versions, "STRAY_AGE_S", 0.0)  # dead for long enough
    out = CliRunner().invoke(app, ["models", "gc", *kafka_overrides])
    assert out.exit_code == 0 and "chunks of publishes that never completed" in out.output, out.output
    fresh = VersionLog(kafka_cfg, ModelStore(tmp_path / "fresh"))
    try:
        fresh.catch_up()
        assert not any(strays.keys for strays in fresh.strays.values()), "every stray chunk was tombstoned"
        assert after in fresh.seen.done and fresh.store.current() == after
    finally:
        fresh.close()


def _topic_keys(cfg: Config) -> list[str]:
    consumer = Consumer(librdkafka_config(cfg, **{"group.id": "keys", "enable.auto.commit": False}))
    try:
        tp = TopicPartition(cfg.topics.model_versions, 0, 0)
        _, end = consumer.get_watermark_offsets(tp, timeout=10)
        consumer.assign([tp])
        keys: list[str] = []
        while end and (not keys or consumer.position([tp])[0].offset < end):
            keys += [m.key().decode() for m in consumer.consume(500, 1.0) if not m.error()]
        return keys
    finally:
        consumer.close()


def _uploads_without_done(cfg: Config) -> set[str]:
    """Versions some upload wrote chunks of but no ``done`` record."""
    keys = _topic_keys(cfg)
    done = {tuple(k.split("/")[:2]) for k in keys if k.endswith("/done")}
    return {k.split("/")[0] for k in keys if k.count("/") == 3 and tuple(k.split("/")[:2]) not in done}


def _wait_for_chunks_without_done(cfg: Config, start: int, at_least: int, timeout_s: float = 60.0) -> None:
    """Until some upload has ``at_least`` chunks on the topic from offset ``start`` on and no ``done`` yet."""
    consumer = Consumer(librdkafka_config(cfg, **{"group.id": "watch", "enable.auto.commit": False}))
    consumer.assign([TopicPartition(cfg.topics.model_versions, 0, start)])
    chunks: dict[tuple[str, ...], int] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(100, 0.05):
                if msg.error() or msg.key() is None:
                    continue
                parts = tuple(msg.key().decode().split("/"))
                if len(parts) == 4:
                    chunks[parts[:2]] = chunks.get(parts[:2], 0) + 1
                    if chunks[parts[:2]] >= at_least:
                        return
                elif parts[-1:] == ("done",):
                    chunks.pop(parts[:2], None)
        raise AssertionError("the publisher wrote no chunks")
    finally:
        consumer.close()


def test_the_records_a_version_is_made_of_are_each_under_the_record_limit(kafka_cfg: Config, tmp_path: Path) -> None:
    create_topics(kafka_cfg)
    log = VersionLog(kafka_cfg, ModelStore(tmp_path / "models"))
    try:
        log.publish(*small_model(kafka_cfg, num_items=20_000, d_model=64))
    finally:
        log.close()
    consumer = Consumer(librdkafka_config(kafka_cfg, **{"group.id": "sizes", "enable.auto.commit": False}))
    consumer.assign([TopicPartition(kafka_cfg.topics.model_versions, 0, 0)])
    try:
        records = consumer.consume(1000, 5.0)
    finally:
        consumer.close()
    sizes = [len(m.value() or b"") + len(m.key()) for m in records if not m.error()]
    assert len(sizes) > 3 and max(sizes) <= CHUNK_BYTES + 100 < BROKER_RECORD_LIMIT, sizes
    done = [json.loads(m.value()) for m in records if m.key().endswith(b"/done")]
    assert len(done) == 1 and [f["name"] for f in done[0]["files"]] == [META, VOCAB, WEIGHTS]


def test_a_store_holding_another_version_under_a_number_refuses_the_topics_and_says_why(kafka_cfg: Config,
                                                                                      tmp_path: Path) -> None:
    create_topics(kafka_cfg)
    v1 = publish_model(kafka_cfg, seed=0)
    legacy = ModelStore(tmp_path / "legacy")
    assert legacy.publish(*small_model(kafka_cfg, seed=5)).version == v1  # same number, never on the topic
    reader = VersionLog(kafka_cfg, legacy)
    try:
        reader.catch_up()
        assert "holds another v000001" in reader.seen.refused[v1] and "move" in reader.seen.refused[v1]
        assert [version for version, _ in reader.new_refusals] == [v1]
    finally:
        reader.close()
