"""``lrustream evaluate-stream`` end to end on a small synthetic stream: both modes run through the real
pipeline and the CSV/PNG hold both curves."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

from lrustream.prequential import run_prequential, score

pytestmark = pytest.mark.kafka


def test_score_uses_the_recommendation_served_before_each_event() -> None:
    sent = {(0, 0): ("u", "a"), (0, 1): ("u", "b"), (0, 2): ("u", "c"), (1, 0): ("v", "a")}
    recs = [{"source": {"partition": 0, "offset": 0}, "items": ["b", "x"]},
            {"source": {"partition": 0, "offset": 1}, "items": ["x", "y"]},
            {"source": {"partition": 0, "offset": 1}, "items": ["x", "y"]},  # a repeat after a crash
            {"source": {"partition": 0, "offset": 2}, "items": ["a"]},
            {"source": {"partition": 1, "offset": 0}, "items": ["a"]}]
    assert score(recs, sent) == [(1.0, 1.0), (0.0, 0.0)]  # b hit at rank 1; c missed; first events unscored


def test_evaluate_stream_writes_frozen_and_online_curves(kafka_bootstrap: str, tmp_path: Path) -> None:
    rng = random.Random(0)
    lines, ts = [], 1_000_000_000
    for user in range(1, 61):
        pos = rng.randrange(50)
        for _ in range(50):
            pos = (pos + rng.choice((1, 1, 2))) % 50
            ts += rng.randint(1, 5)
            lines.append(f"{user}\t{pos + 1}\t5\t{ts}")
    data = tmp_path / "u.data"
    data.write_text("\n".join(lines) + "\n")
    base = [f"kafka.bootstrap_servers={kafka_bootstrap}", "model.max_len=20", "model.d_model=16",
            "train.batch_size=32", "train.val_every=20", "online.steps_per_round=10", "online.recent_buffer=200"]
    summary = run_prequential(base, str(data), tmp_path / "out", limit=None, rate=3000, train_minutes=0.1,
                              online_every=400, bucket=200)
    assert set(summary) == {"frozen", "online"}
    assert summary["frozen"]["scored"] == summary["online"]["scored"] > 1000
    with (tmp_path / "out" / "prequential.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and {"hr10_frozen", "hr10_online", "ndcg10_frozen_cum", "ndcg10_online_cum"} <= set(rows[0])
    assert (tmp_path / "out" / "prequential.png").stat().st_size > 10_000
