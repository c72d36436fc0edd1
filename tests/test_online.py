"""Online learning: the replay buffer, the validation gate, vocabulary growth, and the loop on real Kafka
(worker -> training examples -> trainer round -> published version -> worker swap)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from lrustream.config import Config, load_config
from models.store import ModelStore
from stream.topics import create_topics
from stream.updates import request_refresh
from tests.streamkit import WorkerProcess, publish_model, read_topic, recommendations
from tests.test_hot_swap import wait_for_version
from tests.test_worker import produce_events
from trainer.online import ReplayBuffer, TrainerLoop, run_round


def ring_windows(users: int, length: int, items: int = 40, seed: int = 0) -> list[list[str]]:
    """Users walking a ring of items: a pattern a few fine-tuning steps can pick up."""
    rng = random.Random(seed)
    out = []
    for _ in range(users):
        start = rng.randrange(items)
        out.append([f"i{(start + k) % items + 1}" for k in range(length)])
    return out


def test_replay_buffer_keeps_latest_window_per_user_and_a_bounded_reservoir() -> None:
    buf = ReplayBuffer(recent=3, reservoir=2, seed=0)
    for u in range(10):
        buf.add(f"u{u}", ["a", "b", f"x{u}"])
    buf.add("u9", ["a", "b", "c", "d"])  # a user's newer window replaces the older one
    assert list(buf.recent) == ["u7", "u8", "u9"] and buf.recent["u9"][-1] == "d"
    assert len(buf.reservoir) == 2 and buf.evicted == 7 and len(buf) == 5
    train, held = buf.split(holdout_fraction=0.34)
    assert held == [["a", "b", "c", "d"]]
    assert ["a", "b", "c"] in train and ["a", "b", "c", "d"] not in train, "held-out target never trained on"


def _cfg(tmp_path: Path, *extra: str) -> Config:
    return load_config(overrides=[f"model_store.dir={tmp_path / 'models'}", "online.steps_per_round=30",
                                  "online.lr=0.005", "train.batch_size=32", "model.max_len=20", "online.min_holdout=3",
                                  *extra])


def _buffer(windows: list[list[str]]) -> ReplayBuffer:
    buf = ReplayBuffer(recent=len(windows), reservoir=0)
    for u, w in enumerate(windows):
        buf.add(f"u{u}", w)
    return buf


def test_round_publishes_a_grown_vocabulary_with_parent_and_metrics(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    v1 = publish_model(cfg)
    windows = ring_windows(60, 15)
    windows[0] = [*windows[0], "brand-new-item"]
    result = run_round(cfg, _buffer(windows), ModelStore(cfg.model_store.dir))
    assert result.published is not None, result.line()
    store = ModelStore(cfg.model_store.dir)
    info = store.info(result.published)
    loaded = store.load(result.published)
    assert info.parent == v1 and store.current() == result.published
    assert "brand-new-item" in loaded.vocab and loaded.model.num_items == 41 and result.new_items == 1
    assert loaded.vocab.items()[:40] == store.load(v1).vocab.items(), "old ids keep their meaning"
    assert set(info.metrics) >= {"holdout_NDCG@10", "holdout_Recall@10"}


def test_gate_refuses_a_candidate_worse_than_the_tolerance_and_keeps_serving(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "online.tolerance=-1.0")  # demand +1.0 NDCG: no candidate can pass
    v1 = publish_model(cfg)
    result = run_round(cfg, _buffer(ring_windows(60, 15)), ModelStore(cfg.model_store.dir))
    assert result.published is None and "holdout NDCG@10" in result.reason
    assert ModelStore(cfg.model_store.dir).current() == v1 and ModelStore(cfg.model_store.dir).versions() == [v1]


def test_gate_publishes_nothing_without_enough_held_out_evidence(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "online.min_holdout=50")  # 60 windows hold out 6
    v1 = publish_model(cfg)
    result = run_round(cfg, _buffer(ring_windows(60, 15)), ModelStore(cfg.model_store.dir))
    assert result.published is None and "held-out windows" in result.reason
    assert ModelStore(cfg.model_store.dir).versions() == [v1]


def test_gate_refuses_non_finite_training(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "online.lr=1e38", "train.grad_clip=1e38")
    v1 = publish_model(cfg)
    result = run_round(cfg, _buffer(ring_windows(60, 15)), ModelStore(cfg.model_store.dir))
    assert result.published is None and "non-finite" in result.reason, result.line()
    assert ModelStore(cfg.model_store.dir).current() == v1


def produce_examples(cfg: Config, users: range) -> None:
    from confluent_kafka import Producer

    from stream.kafka import producer_config

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
    first = TrainerLoop(kafka_cfg, log_line=print)
    deadline = time.monotonic() + 30
    while first.events_since < 40 and time.monotonic() < deadline:
        first.poll()
    first.close()  # commits what it consumed
    produce_examples(kafka_cfg, range(40, 50))
    second = TrainerLoop(kafka_cfg, log_line=print)
    try:
        deadline = time.monotonic() + 30
        while second.events_since < 10 and time.monotonic() < deadline:
            second.poll()
        second.poll(timeout_s=2.0)
    finally:
        second.close()
    assert first.events_since == 40
    assert second.events_since == 10 and set(second.buffer.recent) == {f"u{u}" for u in range(40, 50)}


@pytest.mark.kafka
def test_trainer_round_reaches_the_running_worker(kafka_cfg: Config, kafka_overrides: list[str],
                                                  tmp_path: Path) -> None:
    overrides = [*kafka_overrides, "online.steps_per_round=20", "online.every_seconds=3600",
                 "online.every_events=1000000", "train.batch_size=32", "stream.unknown_items=oov",
                 "online.min_holdout=1", "online.tolerance=1.0"]  # random events: the gate is pinned elsewhere
    cfg = load_config(overrides=overrides)
    create_topics(cfg)
    v1 = publish_model(cfg)
    rng = random.Random(7)
    events = [(f"u{rng.randrange(30)}", f"i{rng.randint(1, 40)}") for _ in range(300)]
    events[100], events[200] = ("u1", "new-item"), ("u2", "new-item")  # first seen in the stream
    produce_events(cfg, events)
    worker = WorkerProcess(overrides, tmp_path / "worker.log").start()
    loop = TrainerLoop(cfg, log_line=print)
    try:
        worker.wait_healthy()
        recommendations(cfg, expect=len(events))
        examples = read_topic(cfg, cfg.topics.training_examples, idle_s=2)
        assert examples and all(json.loads(m.value())["items"] for m in examples)
        deadline = time.monotonic() + 30
        while len(loop.buffer) < 30 and time.monotonic() < deadline:
            loop.poll()
        assert len(loop.buffer) == 30, "every active user's window reached the trainer"
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
    finally:
        loop.close()
        worker.stop()
    assert json.loads((Path(cfg.model_store.dir) / "rounds.jsonl").read_text().splitlines()[-1])["published"]
    new = ModelStore(cfg.model_store.dir).load(result.published)
    assert "new-item" in new.vocab and new.model.num_items == 41, "the stream's new item got an embedding"
    assert model_after["num_items"] == 41, "the worker serves the grown vocabulary"
    after = [r for r in recs if r["event_ts"] >= 1_900_000_000_000]
    assert len(after) == 20 and {r["model_version"] for r in after} == {result.published}
    assert ModelStore(cfg.model_store.dir).info(result.published).parent == v1
