"""The online loop on real Kafka: worker -> training examples -> trainer round -> published version -> worker
swap, the trainer's /health, /metrics and operator page (in headless Chromium), and a restarted trainer resuming
where it left off."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from lrustream.kernel.config import Config, load_config
from models.store import ModelStore
from stream.topics import create_topics
from stream.updates import request_refresh
from tests import browser
from tests.streamkit import (
    WorkerProcess,
    produce_events,
    publish_model,
    read_topic,
    recommendations,
    ring_stream,
    wait_for_version,
)
from trainer.online import TrainerLoop


# ----- on the real broker ------------------------------------------------------------------------------------
def produce_examples(cfg: Config, users: range) -> None:
    from confluent_kafka import Producer

    from lrustream.kernel.kafka import producer_config

    producer = Producer(producer_config(cfg))
    for u in users:
        producer.produce(cfg.topics.training_examples, json.dumps({"user_id": f"u{u}", "items": ["a", "b"], "new": 1}),
                         f"u{u}")
    assert producer.flush(30) == 0


@pytest.mark.kafka
def test_a_restarted_trainer_resumes_where_it_left_off(kafka_cfg: Config) -> None:
    """Training examples are read once: a new trainer process starts at the offsets the last one committed."""
    create_topics(kafka_cfg)
    produce_examples(kafka_cfg, range(0, 40))
    first = TrainerLoop(kafka_cfg, log_line=print, serve_http=False)
    deadline = time.monotonic() + 30
    while first.buffer.seen < 40 and time.monotonic() < deadline:
        first.poll()
    first.close()  # commits what it consumed
    produce_examples(kafka_cfg, range(40, 50))
    second = TrainerLoop(kafka_cfg, log_line=print, serve_http=False)
    try:
        deadline = time.monotonic() + 30
        while second.buffer.seen < 10 and time.monotonic() < deadline:
            second.poll()
        second.poll(timeout_s=2.0)
    finally:
        second.close()
    assert first.buffer.seen == 40
    assert second.buffer.seen == 10 and set(second.buffer.users) == {f"u{u}" for u in range(40, 50)}


def rounds_on_request(kafka_overrides: list[str], *extra: str) -> tuple[list[str], Config, str]:
    """Overrides for a worker and a trainer whose rounds run when the test calls them (small model, small
    holdout), the config they make with the topics created, and the first version (a random model)."""
    overrides = [*kafka_overrides, "online.every_seconds=3600", "online.every_events=1000000", "online.min_holdout=30",
                 "online.lr=0.005", "model.max_len=20", "online.http_port=0", *extra]
    cfg = load_config(overrides=overrides)
    create_topics(cfg)
    return overrides, cfg, publish_model(cfg)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.kafka
def test_refresh_publishes_a_gated_version_the_running_worker_serves(kafka_cfg: Config, kafka_overrides: list[str],
                                                                     tmp_path: Path) -> None:
    overrides, cfg, v1 = rounds_on_request(kafka_overrides, "stream.unknown_items=oov", "online.min_steps=30")
    events = ring_stream(30, 600)
    events[100], events[200] = ("u1", "new-item"), ("u2", "new-item")  # first seen in the stream
    produce_events(cfg, events)
    worker = WorkerProcess(overrides, tmp_path / "worker.log").start()
    loop = TrainerLoop(cfg, log_line=print)
    trainer_url = f"http://{cfg.http.host}:{loop.http.port}"
    try:
        worker.wait_healthy()
        recommendations(cfg, expect=len(events))
        examples = read_topic(cfg, cfg.topics.training_examples, idle_s=2)
        assert examples and all(json.loads(m.value())["items"] for m in examples)
        deadline = time.monotonic() + 30
        while loop.buffer.seen < len(events) and time.monotonic() < deadline:
            loop.poll()
        assert loop.buffer.seen == len(events), "every served event reached the trainer"
        request_refresh(cfg, "test")
        while not loop.requested and time.monotonic() < deadline:
            loop.poll()
        assert loop.due()
        result = loop.round()
        assert result.published, result.line()
        wait_for_version(worker, result.published)
        swap = next(s for s in json.loads(worker.get("/model"))["swaps"] if s["version"] == result.published)
        delay = swap["at"] - ModelStore(cfg.model_store.dir).info(result.published).created
        print(f"\nworker served {result.published} {delay:.2f} s after the round published it")
        model_after = json.loads(worker.get("/model"))
        produce_events(cfg, events[:20], ts0=1_900_000_000_000)
        recs = recommendations(cfg, expect=len(events) + 20)
        health, metrics = _get(f"{trainer_url}/health"), _get(f"{trainer_url}/metrics")
        page, _ = browser.render(f"{trainer_url}/", tmp_path, "operator-page.png")

        # a trainer started with a broken learning rate reads the same examples: the gate refuses its candidate
        broken = TrainerLoop(load_config(overrides=[*overrides, "online.lr=10",
                                                    f"online.group_id={cfg.online.group_id}-broken"]), log_line=print)
        try:
            deadline = time.monotonic() + 30
            while broken.buffer.seen < len(events) and time.monotonic() < deadline:
                broken.poll()
            refused = broken.round()
        finally:
            broken.close()
        produce_events(cfg, events[20:30], ts0=1_950_000_000_000)
        recs = recommendations(cfg, expect=len(events) + 30)
    finally:
        loop.close()
        worker.stop()
    assert refused.published is None and refused.refused in {"gate", "non-finite"}, refused.line()
    assert ModelStore(cfg.model_store.dir).current() == result.published
    assert {r["model_version"] for r in recs if r["event_ts"] >= 1_950_000_000_000} == {result.published}, \
        "the worker kept serving the good version"
    records = [json.loads(line) for line in (Path(cfg.model_store.dir) / "rounds.jsonl").read_text().splitlines()]
    assert [r["published"] for r in records] == [result.published, None], "both rounds recorded"
    assert records[0]["gate"]["heldout"] == 60 and records[1]["refused"] == refused.refused
    new = ModelStore(cfg.model_store.dir).load(result.published)
    assert "new-item" in new.vocab and new.model.num_items == 41, "the stream's new item got an embedding"
    assert model_after["num_items"] == 41, "the worker serves the grown vocabulary"
    after = [r for r in recs if 1_900_000_000_000 <= r["event_ts"] < 1_950_000_000_000]
    assert len(after) == 20 and {r["model_version"] for r in after} == {result.published}
    assert ModelStore(cfg.model_store.dir).info(result.published).parent == v1
    assert health[0] == 200 and json.loads(health[1])["serving"] == result.published
    assert "lrustream_trainer_published_total 1.0" in metrics[1]
    assert f'lrustream_trainer_serving_info{{version="{result.published}"}} 1.0' in metrics[1]
    assert "lrustream_trainer_buffer_events 600.0" in metrics[1]
    # the operator page, as a browser shows it, against this worker and trainer: the serving version, the round
    assert f'<td class="l" id="version-serving"><code>{result.published}</code></td>' in page
    assert f"published {result.published}" in page and f"<td>{records[0]['gate']['heldout']}</td>" in page




@pytest.mark.kafka
def test_a_version_that_serves_worse_live_than_its_parent_is_rolled_back(kafka_cfg: Config,
                                                                        kafka_overrides: list[str],
                                                                        tmp_path: Path) -> None:
    """v2 (an online round's, the ring learnt) serves; v3 comes as an online round's version would, parent v2,
    but with the random weights of v1 (as if its gate had been judged on held-out events unlike the live
    stream). The worker scores every event against the recommendation served before it, the examples carry
    those scores, and the trainer, judging v3 on its first live events against v2's last, rolls it back: v2
    serves again, unpinned, and the rollback is logged, counted and listed."""
    from typer.testing import CliRunner

    from lrustream.cli import app

    overrides, cfg, v1 = rounds_on_request(kafka_overrides, "online.min_steps=60", "online.max_steps=60")
    events = ring_stream(30, 1500)
    produce_events(cfg, events[:600])
    worker = WorkerProcess(overrides, tmp_path / "worker.log").start()
    loop = TrainerLoop(cfg, log_line=print)
    seen = 600

    def consume(until: int) -> None:
        deadline = time.monotonic() + 60
        while loop.buffer.seen < until and time.monotonic() < deadline:
            loop.poll()
        assert loop.buffer.seen == until, "every served event reached the trainer"

    try:
        worker.wait_healthy()
        consume(seen)
        v2 = loop.round().published
        assert v2, "the ring is learnt and published"
        wait_for_version(worker, v2)
        produce_events(cfg, events[600:1000], ts0=1_800_000_000_000)
        consume(seen := seen + 400)
        kept = loop.watch()
        assert kept is not None and kept.version == v2 and not kept.roll_back, "v2 serves better than v1: kept"
        store = ModelStore(cfg.model_store.dir)
        bad = store.load(v1)
        v3 = loop.versions.publish(bad.model, store.load(v2).vocab, parent=v2,
                                   notes={"source": "online", "test": "random weights"}).version
        wait_for_version(worker, v3)
        produce_events(cfg, events[1000:], ts0=1_900_000_000_000)
        deadline = time.monotonic() + 60
        verdict = None
        while verdict is None and time.monotonic() < deadline:
            loop.poll()
            verdict = loop.watch()
        wait_for_version(worker, v2)
        metrics = _get(f"http://{cfg.http.host}:{loop.http.port}/metrics")[1]
        worker_metrics = worker.get("/metrics").decode()
    finally:
        loop.close()
        worker.stop()
    assert verdict is not None and verdict.version == v3 and verdict.parent == v2, verdict
    assert verdict.roll_back and verdict.hit_rate < verdict.parent_hit_rate and verdict.diff_high < 0, verdict.line()
    store = ModelStore(cfg.model_store.dir)
    assert store.current() == v2 and store.pinned() is None, "rolled back, not pinned: the next rounds serve"
    [record] = [json.loads(line) for line in (store.root / "rollbacks.jsonl").read_text().splitlines()]
    assert (record["version"], record["parent"], record["rolled_back"]) == (v3, v2, True)
    assert "lrustream_trainer_rollbacks_total 1.0" in metrics
    assert f'lrustream_trainer_live_hit_rate{{version="{v3}"}}' in metrics
    assert f'lrustream_live_events_total{{version="{v2}"}}' in worker_metrics
    listed = CliRunner().invoke(app, ["models", "list", *kafka_overrides]).output
    assert f"{v2} serves after a rollback by trainer: rollback: {v3} serves worse than {v2} live" in listed
