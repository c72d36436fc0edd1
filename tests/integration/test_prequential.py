"""``lrustream evaluate-stream`` end to end on a small synthetic stream: frozen, online and retrain modes through
the real pipeline, every curve in the CSV, online following a shift in the stream."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from lrustream.prequential import (
    run_prequential,
)


def shifting_stream(path: Path, users: int = 60, items: int = 60, per_phase: int = 20, seed: int = 0) -> None:
    """u.data whose next-item rule changes half-way in time: first every user walks a ring (i -> i+1), then a
    fixed random permutation (i -> p(i), never i+1). evaluate-stream trains on the first half, replays the
    second: a model that does not learn from the stream keeps predicting the old rule."""
    rng = random.Random(seed)
    perm = list(range(items))
    while any(perm[i] in (i, (i + 1) % items) for i in range(items)):
        rng.shuffle(perm)
    pos = [rng.randrange(items) for _ in range(users)]
    lines, ts = [], 1_000_000_000
    for phase in (lambda i: (i + 1) % items, lambda i: perm[i]):
        for _ in range(per_phase):
            for u in rng.sample(range(users), users):
                pos[u] = phase(pos[u])
                ts += 1
                lines.append(f"{u + 1}\t{pos[u] + 1}\t5\t{ts}")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.kafka
def test_online_follows_a_shift_in_the_stream_and_frozen_does_not(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Through the real pipeline (broker, worker, trainer, hot swap), every mode: the served
    recommendations of the online run follow the new rule, the frozen ones do not; rounds publish all the way
    through the replay; the CSV, PNG and summary hold every curve."""
    data = tmp_path / "u.data"
    shifting_stream(data)
    base = [f"kafka.bootstrap_servers={kafka_bootstrap}", "model.max_len=20", "model.d_model=16",
            "train.batch_size=32", "train.val_every=20", "stream.exclude_seen=false", "online.min_steps=20",
            "online.max_steps=40", "online.lr=0.01", "online.min_holdout=20"]
    out = tmp_path / "out"
    summary = run_prequential(base, str(data), out, limit=None, rate=35, train_minutes=0.15, online_every=100,
                              bucket=300, retrain_every=600)  # 1200 replayed events: one retrain (and refit) at 600
    modes = summary["modes"]
    assert list(modes) == ["frozen", "online", "reference", "retrain"]
    assert modes["frozen"]["scored"] == modes["online"]["scored"] == modes["retrain"]["scored"] >= 1100
    assert modes["reference"]["scored"] == modes["frozen"]["scored"]
    online = modes["online"]
    assert online["rounds"] == online["published"] + sum(online["refused"].values())
    assert modes["retrain"]["retrains"] == 1 and modes["retrain"]["train_seconds"] > 0
    assert modes["retrain"]["versions"] == ["v000001", "v000002"] and modes["frozen"]["versions"] == ["v000001"]
    reference = modes["reference"]
    assert reference["refits"] == 1 and reference["train_steps"] > 0 and reference["versions"] == ["v000001", "v000002"]
    versus = summary["versus_frozen"]
    assert set(versus) == {"online", "reference", "retrain"}
    assert versus["online"]["paired"] == modes["frozen"]["scored"] and len(versus["online"]["eighths"]) == 8
    assert versus["online"]["HR@10"]["low"] > 0, "online beats frozen with confidence after the shift"
    assert modes["frozen"]["longest_without_new_version"] == 1200, "one version for the whole replay"
    assert online["longest_without_new_version"] < 0.75 * 1200, "new versions keep coming"
    assert json.loads((out / "summary.json").read_text()) == summary
    with (out / "prequential.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {f"{m}_{mode}{cum}" for m in ("hr10", "ndcg10") for mode in modes for cum in ("", "_cum")} <= set(rows[0])
    assert (out / "prequential.png").stat().st_size > 10_000

    last = rows[-1]  # the last 300 scored events, long after the shift
    hr_online, hr_frozen = float(last["hr10_online"]), float(last["hr10_frozen"])
    print(f"\nafter the shift: HR@10 online {hr_online:.3f}, frozen {hr_frozen:.3f}; {online}")
    assert hr_frozen < 0.25, "the frozen model keeps the old rule"
    assert hr_online > 0.5 and hr_online > 2.5 * hr_frozen, "online learning follows the new rule"
    rounds_file = next(out.glob("runs/online-*/models/rounds.jsonl"))
    rounds = [json.loads(line) for line in rounds_file.read_text().splitlines()]
    published_at = [r["buffer_events"] for r in rounds if r["published"]]
    assert len(published_at) >= 3 and max(published_at) >= 0.6 * 1200, f"rounds stopped early: {published_at}"


