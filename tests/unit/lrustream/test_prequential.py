"""``lrustream evaluate-stream`` without a broker: scoring, the summary (round records -> counts, ratios), the
"online published nothing" failure (outputs written first, exit 1), mode parsing."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lrustream import prequential
from lrustream.cli import app
from lrustream.kernel.config import load_config
from lrustream.kernel.errors import UsageError
from lrustream.prequential import (
    ModeRun,
    OnlinePublishedNothing,
    finish,
    longest_without_new_version,
    parse_modes,
    round_stats,
    score,
    starting_model,
    summary_lines,
    version_starts,
)


def test_score_uses_the_recommendation_served_before_each_event() -> None:
    sent = {(0, 0): ("u", "a"), (0, 1): ("u", "b"), (0, 2): ("u", "c"), (1, 0): ("v", "a")}
    recs = [{"source": {"partition": 0, "offset": 0}, "items": ["b", "x"]},
            {"source": {"partition": 0, "offset": 1}, "items": ["x", "y"]},
            {"source": {"partition": 0, "offset": 1}, "items": ["x", "y"]},  # a repeat after a crash
            {"source": {"partition": 0, "offset": 2}, "items": ["a"]},
            {"source": {"partition": 1, "offset": 0}, "items": ["a"]}]
    assert score(recs, sent) == [(1.0, 1.0), (0.0, 0.0)]  # b hit at rank 1; c missed; first events unscored


def test_version_starts_follow_production_order_and_the_longest_stretch_counts_both_ends() -> None:
    sent = {(1, 0): ("u", "a"), (0, 0): ("v", "a"), (1, 1): ("u", "b"), (0, 1): ("v", "b"), (1, 2): ("u", "c")}
    recs = [{"source": {"partition": p, "offset": o}, "model_version": v}
            for (p, o), v in [((1, 0), "v1"), ((0, 0), "v1"), ((1, 1), "v2"), ((1, 1), "v3"), ((0, 1), "v1"),
                              ((1, 2), "v3")]]
    # (1, 1) answered twice (a repeat after a crash): its first answer counts, so v3 begins at event 4
    assert version_starts(recs, sent) == [0, 2, 4]
    assert longest_without_new_version([0, 2, 4], 5) == 2
    assert longest_without_new_version([0, 30_000, 40_000], 100_000) == 60_000  # the tail after the last
    assert longest_without_new_version([0], 7) == 7  # one version served throughout


def test_a_kept_starting_model_is_trained_once_and_then_reused(tmp_path: Path) -> None:
    cfg = load_config(overrides=["model.max_len=20", "model.d_model=16", "train.batch_size=8", "train.val_every=5"])
    rng = random.Random(0)
    warm = [(f"u{rng.randrange(20)}", f"i{rng.randrange(30)}", t) for t in range(600)]
    keep, lines = tmp_path / "start", []
    first, vocab = starting_model(cfg, warm, 0.01, lines.append, keep=keep)
    again, vocab_again = starting_model(cfg, warm, 0.01, lines.append, keep=keep)
    assert "not retrained" not in lines[0] and "not retrained" in lines[1]
    assert vocab_again.items() == vocab.items()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(),
                                                 strict=True))


def test_round_stats_counts_rounds_published_and_refusals_by_code() -> None:
    records = [{"published": "v000002", "refused": None, "seconds": 1.5, "train_seconds": 1.0},
               {"published": None, "refused": "gate", "reason": "held-out NDCG@10 worse", "seconds": 2.0,
                "train_seconds": 1.5},
               {"published": None, "refused": "holdout", "seconds": 0.5},
               {"published": None, "seconds": 1.0},
               {"published": None, "refused": "gate", "seconds": 1.0, "train_seconds": 0.5}]
    assert round_stats(records) == {"rounds": 5, "published": 1, "round_seconds": 6.0, "train_seconds": 3.0,
                                    "refused": {"gate": 2, "holdout": 1, "unknown": 1}}
    assert round_stats([]) == {"rounds": 0, "published": 0, "refused": {}, "round_seconds": 0.0,
                               "train_seconds": 0.0}


def test_parse_modes_keeps_the_canonical_order_and_rejects_unknown_ones() -> None:
    assert parse_modes("retrain, frozen") == ("frozen", "retrain")
    for bad in ("", "frozen,nightly"):
        with pytest.raises(ValueError, match="subset of frozen,online,retrain"):
            parse_modes(bad)


def _runs(online_rounds: list[dict]) -> dict[str, ModeRun]:
    return {"frozen": ModeRun([(1.0, 1.0), (0.0, 0.0)] * 10, ["v000001"]),
            "online": ModeRun([(1.0, 0.5)] * 15 + [(0.0, 0.0)] * 5, ["v000001"], rounds=online_rounds, replayed=30,
                              version_starts=[0, 12]),
            "retrain": ModeRun([(1.0, 1.0)] * 20, ["v000001", "v000002"], retrain_seconds=[3.0, 4.5])}


def test_summary_has_every_mode_and_the_ratios(tmp_path: Path) -> None:
    lines: list[str] = []
    summary = finish(_runs([{"published": "v000002", "seconds": 2.0}]), tmp_path, bucket=5, log=lines.append)
    modes = summary["modes"]
    assert modes["frozen"] == {"HR@10": 0.5, "NDCG@10": 0.5, "scored": 20, "versions": ["v000001"]}
    assert modes["online"]["HR@10"] == 0.75 and modes["online"]["published"] == 1
    assert modes["online"]["longest_without_new_version"] == 18
    assert modes["retrain"]["retrains"] == 2 and modes["retrain"]["train_seconds"] == 7.5
    assert summary["ratios"] == {"online/frozen": 1.5, "online/retrain": 0.75}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert lines[:-1] == summary_lines(summary) and lines[-1].startswith("wrote ")
    assert len(lines) <= 7 and all(len(line) <= 110 for line in lines[:-1])


def test_online_publishing_nothing_raises_after_writing_the_outputs(tmp_path: Path) -> None:
    rounds = [{"published": None, "refused": "gate", "seconds": 1.0}] * 5 + [{"published": None, "refused": "holdout"}]
    with pytest.raises(OnlinePublishedNothing) as err:
        finish(_runs(rounds), tmp_path, bucket=5, log=lambda _: None)
    assert str(err.value) == "online learning published no version in 6 rounds (refused: gate 5, holdout 1)"
    assert err.value.summary["modes"]["online"]["published"] == 0
    assert json.loads((tmp_path / "summary.json").read_text()) == err.value.summary
    with (tmp_path / "prequential.csv").open() as f:
        assert {"hr10_frozen", "hr10_online", "hr10_retrain"} <= set(next(csv.DictReader(f)))
    assert (tmp_path / "prequential.png").exists()


def test_evaluate_stream_exits_1_with_one_line_when_online_published_nothing(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def nothing(*_args: object, **_kwargs: object) -> None:
        raise OnlinePublishedNothing(3, {"gate": 3}, {})

    monkeypatch.setattr(prequential, "run_prequential", nothing)
    result = CliRunner().invoke(app, ["evaluate-stream", "--data", str(tmp_path / "u.data")])
    assert result.exit_code == 1
    assert result.stderr == "error: online learning published no version in 3 rounds (refused: gate 3)\n"
    result = CliRunner().invoke(app, ["evaluate-stream", "--data", "x", "--modes", "frozen,nightly"])
    assert isinstance(result.exception, UsageError) and "subset of frozen,online,retrain" in str(result.exception)




