"""The main job end to end (what ``make demo`` runs), small: model training, worker, replay, recommendations."""

from __future__ import annotations

import random
import re
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
    lines = [f"{u}\t{rng.randint(1, 60)}\t5\t{1000 + k}" for k in range(500) for u in [rng.randint(1, 80)]]
    data = tmp_path / "u.data"
    data.write_text("\n".join(lines) + "\n")
    overrides = [*kafka_overrides, f"http.port={free_port()}", "train.batch_size=32"]
    out: list[str] = []
    run_demo(load_config(overrides=overrides), None, overrides, str(data), events=400, rate=2000,
             train_minutes=0.1, log=out.append, warm_up_s=0.1)
    text = "\n".join(out)
    assert "training lrurec" in text and "worker: serving v000001" in text
    summary = next(line for line in out if line.startswith("summary:"))
    # 200 warm-up + 400 timed asked for, fewer than 600 in the data (500 lines, fewer after the preprocessing):
    # it replays them all and stops once they are served, not at its timeout (600 / 2000 + 120 s)
    counts = re.search(r"summary: (\d+) events published \(200 warm-up, then (\d+) timed\), (\d+) "
                       r"recommendations in ([0-9.]+) s", summary)
    assert counts and "p99" in summary, summary
    sent, timed, served, seconds = int(counts[1]), int(counts[2]), int(counts[3]), float(counts[4])
    assert 200 < sent < 600 and timed == sent - 200 and served == sent and seconds < 120
    assert any(line.startswith("  warm-up (the first 200 events") for line in out)
    asked = [line for line in out if line.startswith("request: GET /recommendations/")]
    assert len(asked) == 3 and "(model v000001)" in asked[0] and "(model v000001)" in asked[1], asked
    assert asked[2].startswith("request: GET /recommendations/a-user-never-seen?k=5 -> popular fallback: "), asked
    cfg = load_config(overrides=overrides)  # what the demo says is checked against the topics themselves
    recs = recommendations(cfg, expect=sent)
    assert len({(r["source"]["partition"], r["source"]["offset"]) for r in recs}) == sent
    assert {r["model_version"] for r in recs} == {"v000001"} and all(len(r["items"]) == 10 for r in recs)
    assert not read_topic(cfg, cfg.topics.dlq, timeout_s=5), "a clean replay dead-letters nothing"
