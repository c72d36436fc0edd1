"""The main job end to end (what ``make demo`` runs), small: model training, worker, replay, recommendations."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lrustream.broker import free_port
from lrustream.demo import run_demo
from lrustream.kernel.config import load_config
from tests.streamkit import read_topic, recommendations


def test_demo_trains_serves_a_replay_and_reports_latency(kafka_bootstrap: str, kafka_overrides: list[str],
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LRUSTREAM_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.chdir(tmp_path)
    rng = random.Random(1)
    lines = [f"{u}\t{rng.randint(1, 60)}\t5\t{1000 + k}" for k in range(3000) for u in [rng.randint(1, 80)]]
    data = tmp_path / "u.data"
    data.write_text("\n".join(lines) + "\n")
    overrides = [*kafka_overrides, f"http.port={free_port()}", "train.batch_size=32"]
    out: list[str] = []
    run_demo(load_config(overrides=overrides), None, overrides, str(data), events=400, rate=2000,
             train_minutes=0.1, log=out.append, warm_up_s=0.1)
    text = "\n".join(out)
    assert "training lrurec" in text and "worker: serving v000001" in text
    summary = next(line for line in out if line.startswith("summary:"))
    assert "600 events published (200 warm-up, then 400 timed), 600 recommendations" in summary and "p99" in summary
    assert any(line.startswith("  warm-up (the first 200 events") for line in out)
    cfg = load_config(overrides=overrides)  # what the demo says is checked against the topics themselves
    recs = recommendations(cfg, expect=600)
    assert len({(r["source"]["partition"], r["source"]["offset"]) for r in recs}) == 600
    assert {r["model_version"] for r in recs} == {"v000001"} and all(len(r["items"]) == 10 for r in recs)
    assert not read_topic(cfg, cfg.topics.dlq, timeout_s=5), "a clean replay dead-letters nothing"
