"""``lrustream evaluate-stream`` without a broker: scoring, pairing modes by source and their intervals against
frozen, the summary (round records -> counts, ratios, compute and gain shares), the "online published nothing"
failure (outputs written first, exit 1), mode parsing, the training recipes and the retrain/reference pause."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from lrustream import prequential
from lrustream.cli import app
from lrustream.kernel.config import load_config
from lrustream.kernel.errors import UsageError
from lrustream.prequential import (
    EARLY_STOP_STEPS,
    FineTuner,
    ModeRun,
    OnlinePublishedNothing,
    Pauser,
    Refit,
    Replay,
    finish,
    longest_without_new_version,
    paired,
    parse_modes,
    round_stats,
    score,
    scores_by_source,
    starting_model,
    summary_lines,
    train_recipe,
    train_start_model,
    version_starts,
    versus_frozen,
)
from models import build_model, model_config
from models.vocab import Vocabulary

TINY = ["model.max_len=20", "model.d_model=16", "train.batch_size=8", "train.val_every=5"]


def test_score_uses_the_recommendation_served_before_each_event() -> None:
    sent = {(0, 0): ("u", "a"), (0, 1): ("u", "b"), (0, 2): ("u", "c"), (1, 0): ("v", "a")}
    recs = [{"source": {"partition": 0, "offset": 0}, "items": ["b", "x"]},
            {"source": {"partition": 0, "offset": 1}, "items": ["x", "y"]},
            {"source": {"partition": 0, "offset": 1}, "items": ["x", "y"]},  # a repeat after a crash
            {"source": {"partition": 0, "offset": 2}, "items": ["a"]},
            {"source": {"partition": 1, "offset": 0}, "items": ["a"]}]
    assert score(recs, sent) == [(1.0, 1.0), (0.0, 0.0)]  # b hit at rank 1; c missed; first events unscored
    assert scores_by_source(recs, sent) == {(0, 1): (1.0, 1.0), (0, 2): (0.0, 0.0)}


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
    cfg = load_config(overrides=TINY)
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
    assert parse_modes("reference,retrain,online") == ("online", "reference", "retrain")
    for bad in ("", "frozen,nightly"):
        with pytest.raises(ValueError, match="subset of frozen,online,reference,retrain"):
            parse_modes(bad)


def _run(scores: list[tuple[float, float]], sources: list[tuple[int, int]] | None = None, **kw: object) -> ModeRun:
    return ModeRun(scores, kw.pop("versions", ["v000001"]), sources=sources or [(0, n) for n in range(len(scores))],
                   **kw)  # type: ignore[arg-type]


def test_modes_are_paired_by_source_and_a_better_mode_has_an_interval_above_zero() -> None:
    rng = random.Random(3)
    both = [(p, o) for o in range(200) for p in range(2)]  # stream order: by offset, then partition
    frozen_scores = [(1.0, 0.5) if rng.random() < 0.3 else (0.0, 0.0) for _ in both]
    better = [(1.0, 1.0)] * len(both)  # a hit where frozen missed, a better rank where frozen hit
    # events only one mode scored (say a late recommendation) are left out, however they scored
    frozen = _run([*frozen_scores, *[(1.0, 1.0)] * 50], [*both, *[(9, o) for o in range(50)]])
    mode = _run([*better[:100], *[(0.0, 0.0)] * 50, *better[100:]],
                [*both[:100], *[(8, o) for o in range(50)], *both[100:]])
    mine, theirs = paired(mode, frozen)
    assert mine.tolist() == [list(s) for s in better] and theirs.tolist() == [list(s) for s in frozen_scores]
    v = versus_frozen(mode, frozen)
    assert v["paired"] == 400
    misses = sum(1 for h, _ in frozen_scores if h == 0) / 400
    assert v["HR@10"]["diff"] == pytest.approx(misses, abs=1e-6) and 0 < v["HR@10"]["low"] <= misses
    assert v["HR@10"]["high"] >= misses and 0 < v["NDCG@10"]["low"] <= v["NDCG@10"]["diff"] <= v["NDCG@10"]["high"]
    assert len(v["eighths"]) == 8 and all(r > 1 for r in v["eighths"])
    assert list(v) == ["HR@10", "NDCG@10", "eighths", "paired"]


def test_identical_modes_have_an_interval_containing_zero_and_eighths_of_one() -> None:
    scores = [(1.0, 1 / (1 + n % 4)) if n % 3 == 0 else (0.0, 0.0) for n in range(160)]
    v = versus_frozen(_run(scores), _run(list(scores)))
    for metric in ("HR@10", "NDCG@10"):
        assert v[metric]["low"] <= 0 <= v[metric]["high"] and v[metric]["diff"] == 0
    assert v["eighths"] == [1.0] * 8 and v["paired"] == 160
    assert versus_frozen(_run(scores), _run(scores, [(1, n) for n in range(160)])) == {"paired": 0}


def _runs(online_rounds: list[dict]) -> dict[str, ModeRun]:
    return {"frozen": _run([(1.0, 1.0), (0.0, 0.0)] * 10),
            "online": _run([(1.0, 0.5)] * 15 + [(0.0, 0.0)] * 5, rounds=online_rounds, replayed=30,
                           version_starts=[0, 12]),
            "retrain": _run([(1.0, 1.0)] * 20, versions=["v000001", "v000002"],
                            refits=[Refit(3.0, 30), Refit(4.5, 40)])}


def test_summary_has_every_mode_and_the_ratios(tmp_path: Path) -> None:
    lines: list[str] = []
    summary = finish(_runs([{"published": "v000002", "seconds": 2.0}]), tmp_path, bucket=5, log=lines.append)
    modes = summary["modes"]
    assert modes["frozen"] == {"HR@10": 0.5, "NDCG@10": 0.5, "scored": 20, "versions": ["v000001"]}
    assert modes["online"]["HR@10"] == 0.75 and modes["online"]["published"] == 1
    assert modes["online"]["longest_without_new_version"] == 18
    assert modes["retrain"]["retrains"] == 2 and modes["retrain"]["train_seconds"] == 7.5
    assert modes["retrain"]["train_steps"] == 70
    assert summary["ratios"] == {"online/frozen": 1.5, "online/retrain": 0.75}
    assert set(summary["versus_frozen"]) == {"online", "retrain"} and summary["online_vs_reference"] == {}
    assert summary["versus_frozen"]["retrain"]["HR@10"]["diff"] == 0.5
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert lines[:-1] == summary_lines(summary) and lines[-1].startswith("wrote ")
    assert len(lines) <= 12 and all(len(line) <= 110 for line in lines[:-1])


def test_summary_with_a_reference_mode_gives_its_compute_and_the_gain_online_captured(tmp_path: Path) -> None:
    runs = _runs([{"published": "v000002", "seconds": 3.0, "train_seconds": 2.0}])
    runs["reference"] = _run([(1.0, 1.0)] * 20, versions=["v000001", "v000002", "v000003"],
                             refits=[Refit(10.0, 100), Refit(30.0, 300)])
    lines: list[str] = []
    summary = finish(runs, tmp_path, bucket=5, log=lines.append)
    assert list(summary["modes"]) == ["frozen", "online", "retrain", "reference"]
    reference = summary["modes"]["reference"]
    assert (reference["refits"], reference["train_seconds"], reference["train_steps"]) == (2, 40.0, 400)
    assert summary["ratios"]["online/reference"] == 0.75
    # online: HR@10 +0.25 over frozen, reference +0.5: half the gain for 2 of its 40 training seconds
    assert summary["versus_frozen"]["online"]["HR@10"]["diff"] == 0.25
    assert summary["online_vs_reference"] == {"train_seconds_share": 0.05, "hr10_gain_share": 0.5}
    assert "          2 refits: 40 s of training, 400 steps" in lines
    assert "online/reference: 5% of its training seconds, 50% of its HR@10 gain over frozen (gain captured)" in lines
    assert any(line.startswith("          vs frozen, 95% CI: HR@10 +0.5000 [+0.") for line in lines)
    # eighths of 3, 3, 3, 3, 2, 2, 2, 2 events; frozen hits every other one, from the first
    eighths = "1.50 3.00 1.50 3.00 2.00 2.00 2.00 2.00"
    assert f"          HR@10 / frozen by eighth of the 20 paired events: {eighths}" in lines
    assert summary["versus_frozen"]["reference"]["eighths"] == [float(r) for r in eighths.split()]
    assert all(len(line) <= 110 for line in lines[:-1])
    del runs["frozen"]
    summary = finish(runs, tmp_path, bucket=5, log=lambda _: None)
    assert summary["versus_frozen"] == {} and summary["online_vs_reference"] == {"train_seconds_share": 0.05}
    assert summary_lines(summary)[-1] == "online/reference: 5% of its training seconds"


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
    assert isinstance(result.exception, UsageError)
    assert "subset of frozen,online,reference,retrain" in str(result.exception)
    result = CliRunner().invoke(app, ["evaluate-stream", "--data", "x", "--start", "forever"])
    assert isinstance(result.exception, UsageError) and "early-stop, budget" in str(result.exception)


def test_the_start_recipes_early_stop_lifts_max_steps_and_budget_keeps_them() -> None:
    cfg = load_config(overrides=[*TINY, "train.max_steps=10", "train.patience=2"])
    assert train_recipe(cfg, "budget") == cfg.train
    early = train_recipe(cfg, "early-stop")
    assert early.max_steps == EARLY_STOP_STEPS and early.patience == 2 and cfg.train.max_steps == 10
    with pytest.raises(ValueError, match="early-stop, budget"):
        train_recipe(cfg, "forever")
    rng = random.Random(0)
    warm = [(f"u{rng.randrange(20)}", f"i{rng.randrange(30)}", t) for t in range(400)]
    lines: list[str] = []
    _, _, hist = train_start_model(cfg, warm, 1.0, lines.append, start="budget")
    assert hist.steps_done == 10 and "10 steps" in lines[0] and "stopped by max_steps=10" in lines[0]
    _, _, hist = train_start_model(cfg, warm, 0.05, lines.append)  # early stop (or the 3 s cap), not max_steps
    assert hist.steps_done > 10 and "max_steps" not in lines[1] and hist.stopped_because in lines[1]


def _events(rng: random.Random, users: int, items: list[str], n: int, t0: int) -> list[tuple[str, str, int]]:
    return [(f"u{rng.randrange(users)}", rng.choice(items), t0 + t) for t in range(n)]


def test_the_reference_fine_tunes_the_served_model_on_a_vocabulary_that_extends_the_served_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.loop

    cfg = load_config(overrides=TINY)
    rng = random.Random(1)
    warm = _events(rng, 20, [f"i{n}" for n in range(30)], 400, 0)
    vocab = Vocabulary(item for _, item, _ in warm)
    torch.manual_seed(0)
    served = build_model(model_config(cfg.model), len(vocab)).eval()
    served_before = {k: v.clone() for k, v in served.state_dict().items()}
    starts: list[tuple[torch.Tensor, int]] = []  # the item table each fine-tuning starts from, and max_steps
    real_train = trainer.loop.train

    def spy(model, split, recipe, *args, **kwargs):  # type: ignore[no-untyped-def]
        starts.append((model.token.weight.detach().clone(), recipe.max_steps))
        return real_train(model, split, recipe, *args, **kwargs)

    monkeypatch.setattr(trainer.loop, "train", spy)
    tuner, lines = FineTuner(cfg, served, vocab, 0.01, []), []
    tuner.log = lines.append
    seen = warm + _events(rng, 25, [f"i{n}" for n in range(20, 40)], 200, 400)
    model, grown, hist = tuner(seen, "reference 1")
    n, new_items = len(vocab), list(dict.fromkeys(item for _, item, _ in seen[400:] if item not in vocab))
    assert vocab.is_prefix_of(grown) and grown.items()[n:] == new_items and len(new_items) == 10
    table, max_steps = starts[0]
    assert max_steps == EARLY_STOP_STEPS and table.shape[0] == len(grown) + 2
    served_table = served.token.weight.detach()
    assert torch.equal(table[: n + 1], served_table[: n + 1])  # the known items start at the served weights
    assert torch.equal(table[n + 1:], served_table[n + 1].expand(len(new_items) + 1, -1))  # new ones at OOV's
    assert not torch.equal(model.token.weight[: n + 1], served_table[: n + 1])  # ... and were trained
    assert all(torch.equal(v, served_before[k]) for k, v in served.state_dict().items())  # served one untouched
    assert (tuner.model, tuner.vocab) == (model, grown) and hist.steps_done > 0 and lines[0].startswith("reference 1:")
    tuner(seen + _events(rng, 25, [f"i{n}" for n in range(35, 45)], 100, 600), "reference 2")
    assert grown.is_prefix_of(tuner.vocab) and len(tuner.vocab) == 45
    assert torch.equal(starts[1][0][: len(grown) + 1], model.token.weight.detach()[: len(grown) + 1])


def test_a_pause_drains_makes_the_next_model_from_everything_seen_publishes_it_and_waits_until_served(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import stream.versions

    calls: list[tuple] = []
    monkeypatch.setattr(stream.versions, "publish_version",
                        lambda cfg, model, vocab, **kw: calls.append(("publish", model, kw["reason"], kw["notes"]))
                        or SimpleNamespace(version="v000002"))
    monkeypatch.setattr(prequential, "wait_serving", lambda cfg, version: calls.append(("serving", version)))
    recs = SimpleNamespace(wait_for=lambda n, _timeout: calls.append(("drain", n)) or True, sources=set())
    warm, events = [("u", "a", 0)], [("u", "b", 1), ("v", "c", 2), ("v", "d", 3)]
    plan = Replay([], Path(), warm, events, None, None, 1.0, 1, 2, 0.1, print)

    def next_model(seen: list, label: str) -> tuple:
        calls.append(("train", seen, label))
        return "model", "vocab", SimpleNamespace(steps_done=7)

    pause = Pauser(load_config(), plan, recs, "reference", next_model)  # type: ignore[arg-type]
    pause(2, {(0, 0): ("u", "b"), (0, 1): ("v", "c")})
    assert calls == [("drain", 2), ("train", warm + events[:2], "reference 1"),
                     ("publish", "model", "reference", {"source": "prequential reference", "events": 3}),
                     ("serving", "v000002")]
    assert len(pause.refits) == 1 and pause.refits[0].steps == 7 and pause.refits[0].seconds >= 0




