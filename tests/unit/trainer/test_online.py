"""Online learning without a broker: the event buffer (time-ordered holdout), the learner (warm start, AdamW
moments carried and resized), the gate (paired bootstrap; refusals with numbers)."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from lrustream.kernel.config import Config, ModelConfig, load_config
from models import MODEL_NAMES, LRURecConfig, build_model, model_config
from models.store import ModelStore, popular_seed
from tests.streamkit import (
    publish_model,
    ring_stream,
)
from trainer.buffer import EventBuffer, HeldEvent
from trainer.evaluate import left_pad
from trainer.gate import Verdict, event_metrics, judge, needed_heldout, needed_hits, paired_bootstrap
from trainer.online import (
    LR_GROW,
    LR_RANGE,
    LR_SHRINK,
    OnlineLearner,
    backward_groups,
    covering_draws,
    length_groups,
)
from trainer.optim import make_optimizer, warm_up


def fill(buf: EventBuffer, events: list[tuple[str, str]], history: dict[str, list[str]] | None = None) -> None:
    """What the worker sends: after each event, the user's window with one new item."""
    history = {} if history is None else history
    for user, item in events:
        history.setdefault(user, []).append(item)
        buf.add(user, history[user][-buf.max_len:], 1)


# ----- the buffer --------------------------------------------------------------------------------------------
def test_holdout_is_the_most_recent_new_events_and_training_stops_before_them() -> None:
    buf = EventBuffer(recent_users=10, reservoir_users=4, max_len=50)
    fill(buf, [("a", "a1"), ("b", "b1"), ("a", "a2"), ("b", "b2"), ("a", "a3"), ("c", "c1"), ("b", "b3"),
               ("a", "a4")])
    held, until = buf.holdout(3)
    assert [(h.user, h.prefix, h.target) for h in held] == [
        ("a", ["a1", "a2"], "a3"), ("b", ["b1", "b2"], "b3"), ("a", ["a1", "a2", "a3"], "a4")], \
        "c1 (a first event) has no prefix to judge from: three judgeable events reach back to a3"
    assert until == 4, "training stops before a3, event number 4"
    with_new, others = buf.training_windows(until)
    assert sorted(with_new) == [["a1", "a2"], ["b1", "b2"]], "no held-out target (nor c1, after it) is trained on"
    assert others == []
    buf.trained = until  # a published round: the held-out events become trainable next time
    assert buf.new_events == 4
    fill(buf, [("d", "d1"), ("d", "d2")])
    with_new, _ = buf.training_windows(buf.seen)
    assert ["a1", "a2", "a3", "a4"] in with_new and ["c1", "d1", "d2"] not in with_new and ["d1", "d2"] in with_new


def test_evicted_users_go_to_a_bounded_reservoir_and_are_replayed_as_others() -> None:
    buf = EventBuffer(recent_users=3, reservoir_users=2, max_len=4, seed=0)
    fill(buf, [(f"u{u}", f"x{k}") for u in range(10) for k in range(6)])
    assert list(buf.users) == ["u7", "u8", "u9"] and buf.users["u9"].items == ["x2", "x3", "x4", "x5"]
    assert len(buf.reservoir) == 2 and buf.evicted == 7 and buf.seen == 60
    buf.trained = 54
    with_new, others = buf.training_windows(60)
    assert with_new == [["x2", "x3", "x4", "x5"]], "u9's events 54..59 are new"
    assert len(others) == 4, "u7 and u8 and the reservoir's two windows are replay"
    assert buf.training_windows(57)[0] == [], "cut before event 57, u9's window keeps x2 only: too short to train"


def test_events_whose_window_moved_on_are_counted_but_not_held_out() -> None:
    buf = EventBuffer(recent_users=5, reservoir_users=0, max_len=3)
    fill(buf, [("a", f"a{k}") for k in range(10)])
    held, _ = buf.holdout(100)
    assert [h.target for h in held] == ["a8", "a9"], "only events with a prefix still in the window are judged"
    buf.add("a", ["a12", "a13", "a14"], 5)  # one micro-batch served 5 events of a; the window keeps 3
    buf.add("b", ["b5", "b6", "b7"], 8)  # a new user whose first example already spans more than its window
    assert buf.seen == 23 and buf.users["a"].total == 15 and buf.users["b"].total == 8
    held, _ = buf.holdout(100)
    assert [h.target for h in held][-4:] == ["a13", "a14", "b6", "b7"]


# ----- the gate ----------------------------------------------------------------------------------------------
def test_grouped_event_metrics_equal_one_row_per_event(tmp_path: Path) -> None:
    """The gate's shortcut (one forward pass per run of a user's events) ranks exactly as one row per event
    would, as long as the run leaves the events their whole context."""
    from trainer.evaluate import left_pad, ranks_of

    cfg = load_config(overrides=[f"model_store.dir={tmp_path}", "model.max_len=16"])
    publish_model(cfg, num_items=30, local=True)
    loaded = ModelStore(tmp_path).load()
    rng = random.Random(1)
    held = []
    for u in range(6):
        seq = [f"i{rng.randint(1, 30)}" for _ in range(rng.randint(3, 9))]
        held += [HeldEvent(f"u{u}", seq[:j], seq[j]) for j in range(1, len(seq))]
    hit, ndcg = event_metrics(loaded.model, loaded.vocab, held, context=16)
    x = left_pad([np.array([loaded.vocab.id_of(t) for t in h.prefix]) for h in held], 16)
    y = torch.tensor([loaded.vocab.id_of(h.target) for h in held])
    with torch.no_grad():
        ranks = ranks_of(loaded.model.score(loaded.model.last_hidden(x)).float(), x, y).double().numpy()
    assert hit.tolist() == (ranks <= 10).astype(float).tolist()
    np.testing.assert_allclose(ndcg, np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0.0), rtol=1e-6)


def test_paired_bootstrap_interval_covers_the_mean_and_shrinks_with_evidence() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.01, 0.2, 200), rng.normal(0.01, 0.2, 20_000)
    lo_s, hi_s = paired_bootstrap(small, 1000, 0.95)
    lo_l, hi_l = paired_bootstrap(large, 1000, 0.95)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 5 and lo_l > 0, "20,000 events resolve a +0.01 difference"


def test_the_gate_refuses_a_worse_candidate_and_one_it_cannot_tell_and_says_why_with_numbers() -> None:
    o = load_config().online
    rng = np.random.default_rng(0)
    serving_hit = (rng.random(2000) < 0.5).astype(float)  # about 1,000 hits: enough to tell
    serving = (serving_hit, serving_hit * 0.5)
    better = judge((serving[0], serving[1] + 0.01), serving, o)
    assert better.refusal == "" and better.code == "" and better.numbers["heldout"] == 2000
    assert better.candidate["NDCG@10"] == pytest.approx(better.serving["NDCG@10"] + 0.01)
    assert better.numbers["margin"] == pytest.approx(o.tolerance * better.serving["NDCG@10"])
    worse = judge((serving[0], serving[1] - rng.normal(0.05, 0.01, 2000)), serving, o)
    assert worse.code == "gate" and "below zero" in worse.refusal and worse.numbers["diff_high"] < 0
    noisy = np.tile([-0.5, 0.5], 1000)  # as good on average: the wide interval is no evidence of harm
    assert judge((serving[0], serving[1] + noisy), serving, o).code == ""
    slightly = judge((serving[0], serving[1] + noisy - 0.07 * serving[1].mean()), serving, o)  # 7 % worse
    assert slightly.code == "gate" and slightly.numbers["diff_high"] > 0 and "mean below" in slightly.refusal

    rare = (rng.random(2000) < 0.02).astype(float)  # about 40 hits
    swing = np.where(rng.random(2000) < 0.02, rng.choice([-0.3, 0.3], 2000), 0.0)  # as good, give or take
    unsure = judge((rare, rare * 0.5 + swing), (rare, rare * 0.5), o)
    assert unsure.code == "inconclusive" and f"{needed_hits(o)} tell a drop" in unsure.refusal
    assert unsure.numbers["needed"] == pytest.approx(needed_heldout(unsure.serving["HR@10"], o))


def test_the_margin_is_relative_so_a_sparse_stream_refuses_a_large_relative_drop() -> None:
    """On a sparse stream (NDCG@10 near 0.01) a candidate a third worse differs by 0.003 on average: half of an
    absolute margin of 0.005 would be, and no evidence at all."""
    o = load_config().online
    rng = np.random.default_rng(1)
    n = 20_000
    serving_ndcg = np.where(rng.random(n) < 0.02, 0.5, 0.0)  # HR@10 2 %, NDCG@10 about 0.01
    lost = serving_ndcg * (rng.random(n) < 1 / 3)  # the candidate misses a third of serving's hits
    verdict = judge((serving_ndcg > 0, serving_ndcg - lost), (serving_ndcg > 0, serving_ndcg), o)
    assert verdict.code == "gate" and verdict.numbers["diff"] > -0.005, verdict.refusal


def test_the_needed_holdout_sees_the_detectable_drop_with_the_configured_power() -> None:
    """At needed_heldout events (about 150 of serving's hits) a candidate that loses ``detectable_drop`` of them
    is refused at least ``power`` of the time and an equally good one is published; at a tenth of that the worse
    one is never published."""
    o = dataclasses.replace(load_config().online, bootstrap_samples=400)
    rng = np.random.default_rng(2)
    assert 100 < needed_hits(o) < 250
    rate = 0.1
    n = needed_heldout(rate, o)
    assert n is not None and n == pytest.approx(needed_hits(o) / rate, abs=1)

    def code(events: int, lose: float, swap: float) -> str:
        hit = rng.random(events) < rate
        cand = hit & (rng.random(events) >= lose)
        swaps = rng.random(events) < swap  # some events gain a hit, as many lose one: equal on average
        cand_ndcg = np.where(swaps, rng.choice([0.0, 0.5], events), cand * 0.5)
        return judge((cand_ndcg > 0, cand_ndcg), (hit.astype(float), hit * 0.5), o).code

    assert sum(code(n, o.detectable_drop, 0.0) == "gate" for _ in range(40)) / 40 >= o.power
    assert sum(code(n, 0.0, 0.02) == "" for _ in range(40)) / 40 >= o.power
    assert all(code(n // 10, o.detectable_drop, 0.0) in {"gate", "inconclusive"} for _ in range(10))


def test_a_fresh_optimiser_ramps_its_learning_rate_up() -> None:
    model = build_model(LRURecConfig(d_model=8, max_len=4), num_items=10)
    opt = make_optimizer(model, load_config().train)
    lrs = []
    for _ in range(4):
        warm_up(opt, 0.01, warmup_steps=3)
        lrs.append([group["lr"] for group in opt.param_groups])
        model(torch.tensor([[1, 2, 3]])).sum().backward()
        opt.step()
    assert lrs == [[pytest.approx(0.01 * k / 3)] * 2 for k in (1, 2, 3, 3)]
    warm_up(opt, 0.02, warmup_steps=0)
    assert [group["lr"] for group in opt.param_groups] == [0.02, 0.02]


# ----- rounds ------------------------------------------------------------------------------------------------
def _cfg(tmp_path: Path, *extra: str) -> Config:
    return load_config(overrides=[f"model_store.dir={tmp_path / 'models'}", "online.min_steps=30",
                                  "online.max_steps=30", "online.lr=0.005", "online.batch_size=32",
                                  "model.max_len=20", "online.min_holdout=20", "online.max_train_seconds=60", *extra])


@dataclass
class Setting:
    """A published random model (v1), its store, and a buffer holding ``events`` with their history."""

    cfg: Config
    v1: str
    store: ModelStore
    buf: EventBuffer
    history: dict[str, list[str]]

    @classmethod
    def make(cls, tmp_path: Path, events: list[tuple[str, str]], *extra: str) -> Setting:
        cfg = _cfg(tmp_path, *extra)
        v1 = publish_model(cfg, local=True)
        buf, history = EventBuffer(100, 100, cfg.model.max_len), {}
        fill(buf, events, history)
        return cls(cfg, v1, ModelStore(cfg.model_store.dir), buf, history)


def test_a_round_learns_the_stream_publishes_a_grown_vocabulary_and_the_next_round_continues(tmp_path: Path) -> None:
    events = ring_stream(30, 1500)
    events[-200] = (events[-200][0], "brand-new-item")  # still in its user's window at the round
    s = Setting.make(tmp_path, events)
    cfg, v1, store, buf, history = s.cfg, s.v1, s.store, s.buf, s.history
    learner = OnlineLearner(cfg, store)
    first = learner.round(buf)
    assert first.published is not None and first.refused is None, first.line()
    assert first.candidate["HR@10"] > first.serving["HR@10"] + 0.2, "the ring rule was learnt"
    assert first.gate["diff_low"] > 0 and first.gate["heldout"] == 150 and first.new_items == 1
    info, loaded = store.info(first.published), store.load(first.published)
    assert info.parent == v1 and store.current() == first.published
    seed = popular_seed(info)  # the counts of the windows it trained on
    assert "brand-new-item" in seed and set(seed) <= set(loaded.vocab.items()) and min(seed.values()) >= 1
    assert "brand-new-item" in loaded.vocab and loaded.model.num_items == 41
    assert loaded.vocab.items()[:40] == store.load(v1).vocab.items(), "old ids keep their meaning"
    assert buf.trained == 1350 and buf.new_events == 150, "the held-out events are trained next round"

    # the next round continues the same learner: its AdamW moments carry over and grow with the vocabulary
    moments_before = {k: v["exp_avg_sq"].clone() for k, v in learner.opt.state_dict()["state"].items()}
    more = ring_stream(30, 400, seed=1)
    more[-300] = (more[-300][0], "another-new-item")
    fill(buf, more, history)
    second = learner.round(buf)
    assert second.published is not None, second.line()
    assert learner.warm_starts == 1, "no fresh start: the learner stands for the version it published"
    state = learner.opt.state_dict()["state"]
    grown = [k for k, v in moments_before.items() if v.shape != state[k]["exp_avg_sq"].shape]
    assert grown, "the embedding's moments were resized"
    for k in grown:
        old, new = moments_before[k], state[k]["exp_avg_sq"]
        assert new.shape[0] == old.shape[0] + 1 and torch.all(new[1: old.shape[0] - 1] > 0), \
            "old rows keep their (updated) second moments"


def test_a_round_above_the_sampled_softmax_threshold_learns_with_sparse_updates_and_grows(tmp_path: Path) -> None:
    events = ring_stream(30, 1500)
    events[-200] = (events[-200][0], "brand-new-item")
    s = Setting.make(tmp_path, events, "train.sampled_softmax_above=10", "train.negatives=8")
    learner = OnlineLearner(s.cfg, s.store)
    result = learner.round(s.buf)
    assert learner.sampling.applies(result.vocabulary) and result.new_items == 1
    assert result.published is not None and result.candidate["HR@10"] > result.serving["HR@10"], result.line()
    table = learner.model.item_table()[0]
    assert learner.opt.state[table]["exp_avg"].shape == table.shape  # AdamW's own moments, grown with the table


def test_a_full_vocabulary_leaves_new_items_unknown_and_still_learns(tmp_path: Path) -> None:
    """online.max_items bounds the vocabulary: items past it read as the unknown-item token
    and are no target; the rest of the stream is still learnt and published."""
    events = ring_stream(30, 1500)
    for k, at in enumerate((-200, -190, -180)):  # three new items, room for one
        events[at] = (events[at][0], f"new-item-{k}")
    s = Setting.make(tmp_path, events, "online.max_items=41")
    learner = OnlineLearner(s.cfg, s.store)
    result = learner.round(s.buf)
    assert (result.new_items, result.unknown_items, result.vocabulary) == (1, 2, 41), result.line()
    assert result.published is not None and "2 left unknown: the vocabulary is full" in result.line()
    assert s.store.load(result.published).model.num_items == 41 and "new-item-0" in learner.vocab
    rows = [np.array([3, -1, 5, -1]), np.array([-1, 7])]
    (tokens, labels), = length_groups(rows, 1, oov=42)
    assert tokens.tolist() == [[0, 0, 42], [3, 42, 5]] and labels.tolist() == [[0, 0, 7], [0, 5, 0]]  # by length


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_length_groups_give_the_step_of_one_padded_batch(name: str) -> None:
    torch.manual_seed(0)
    section = ModelConfig(d_model=16, num_layers=2, dropout=0.0, attn_dropout=0.0, max_len=24)
    model = build_model(model_config(section, name), 30)
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 31, size=n) for n in (2, 25, 7, 3, 13, 25, 5, 9, 17, 4)]

    def grads(groups: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        total = backward_groups(model, groups, torch.device("cpu"))
        return total, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    one = [(left_pad([w[:-1] for w in rows], 24), left_pad([w[1:] for w in rows], 24))]
    grouped = length_groups(rows, 4)
    assert len(grouped) == 4 and [g[0].shape[1] for g in grouped] == [3, 8, 24, 24], "each group padded to its own"
    loss_one, grads_one = grads(one)
    loss_grouped, grads_grouped = grads(grouped)
    assert loss_grouped == pytest.approx(loss_one, rel=1e-5)
    for a, b in zip(grads_one, grads_grouped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_covering_draws_give_every_user_with_new_events_a_turn_before_any_repeats() -> None:
    draws = covering_draws(10, 4, torch.Generator().manual_seed(0))
    first = [next(draws) for _ in range(5)]  # 20 draws: two full passes over the 10 users
    flat = [i for batch in first for i in batch]
    assert all(len(b) == 4 for b in first)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10)), "each pass covers all"
    assert flat[:10] != list(range(10)), "in a shuffled order"
    assert next(covering_draws(3, 7, torch.Generator().manual_seed(0))).count(0) >= 2, "fewer users than rows"


def test_a_fresh_optimiser_warms_up_once_and_the_ramp_survives_rounds_and_refusals(tmp_path: Path) -> None:
    s = Setting.make(tmp_path, ring_stream(30, 1500), "online.min_steps=5", "online.max_steps=5",
                     "online.warmup_steps=10", "online.max_train_seconds=1000")
    learner = OnlineLearner(s.cfg, s.store)
    first = learner.round(s.buf)
    assert first.published and first.lr == s.cfg.online.lr, "first round"
    assert learner.opt.param_groups[0]["lr"] == pytest.approx(first.lr * 5 / 10), "5 of the 10 warm-up steps"
    fill(s.buf, ring_stream(30, 600, seed=1), s.history)
    second = learner.round(s.buf)
    assert second.published, "second round"
    assert learner.opt.param_groups[0]["lr"] == pytest.approx(second.lr), "the ramp went on from step 6, not from 1"
    s.store.set_current(s.v1)  # an operator rolls back
    fill(s.buf, ring_stream(30, 600, seed=2), s.history)
    third = learner.round(s.buf)
    assert third.published, "round after the rollback"
    assert learner.warm_starts == 2 and learner.opt.param_groups[0]["lr"] == pytest.approx(third.lr * 5 / 10), \
        "a rollback means a fresh optimiser, so a fresh ramp"


def test_the_learning_rate_follows_the_gate(tmp_path: Path) -> None:
    s = Setting.make(tmp_path, ring_stream(30, 1500))
    lr = s.cfg.online.lr
    learner = OnlineLearner(s.cfg, s.store)
    first = learner.round(s.buf)
    assert first.published and first.gate["diff"] > 0 and first.lr == lr
    assert learner.lr == lr, "a candidate that beat serving: the full rate, never more"
    assert s.store.info(first.published).notes["lr"] == lr, "the version notes the rate it was trained at"

    harmful = OnlineLearner(_cfg(tmp_path, "online.lr=1"), s.store)
    fill(s.buf, ring_stream(30, 600, seed=2), s.history)
    refused = harmful.round(s.buf)
    assert refused.refused == "gate" and refused.gate["diff"] < 0, refused.line()
    assert harmful.lr == pytest.approx(refused.lr * LR_SHRINK), "a candidate that did not beat serving: smaller"
    assert harmful.next_lr(math.nan) == pytest.approx(harmful.lr * LR_SHRINK), "so do weights not finite"
    harmful.lr = 1e-9
    assert harmful.next_lr(-1.0) == pytest.approx(1 / LR_RANGE), "never below online.lr / LR_RANGE"
    harmful.lr = 0.1
    assert harmful.next_lr(1.0) == pytest.approx(0.1 * LR_GROW), "one that beat serving: back up"
    harmful.lr = 0.9
    assert harmful.next_lr(1.0) == 1, "never above online.lr"


@pytest.mark.parametrize(("broken", "refused"), [(["online.lr=10", "online.warmup_steps=0"], "non-finite"),
                                                 (["online.lr=1"], "gate")])
def test_a_broken_candidate_is_refused_with_numbers_and_the_learner_goes_back(tmp_path: Path, broken: list[str],
                                                                              refused: str) -> None:
    s = Setting.make(tmp_path, ring_stream(30, 1500))
    store, buf, history = s.store, s.buf, s.history
    v2 = OnlineLearner(s.cfg, store).round(buf).published
    assert v2
    fill(buf, ring_stream(30, 600, seed=2), history)
    trained = buf.trained
    learner = OnlineLearner(_cfg(tmp_path, *broken), store)  # a deliberately broken fine-tuning
    result = learner.round(buf)
    assert result.published is None and result.refused == refused, result.line()
    if refused == "gate":
        assert "held-out NDCG@10" in result.reason and "interval" in result.reason and "below zero" in result.reason
        assert result.gate["diff_high"] < 0
    assert store.current() == v2 and buf.trained == trained, "nothing published; the events stay new"
    served = store.load(v2).model.state_dict()
    assert all(torch.equal(served[k], v) for k, v in learner.model.state_dict().items()), "candidate discarded"


def test_a_round_without_enough_evidence_or_with_non_finite_training_publishes_nothing(tmp_path: Path) -> None:
    s = Setting.make(tmp_path, ring_stream(30, 1500), "online.min_holdout=200")
    result = OnlineLearner(s.cfg, s.store).round(s.buf)  # 10 % of 1500 = 150 < 200: 200 held, 1300 to train
    assert result.published is not None, "min_holdout is reachable: the fraction is raised to meet it"
    s = Setting.make(tmp_path / "few", ring_stream(30, 300), "online.min_holdout=200")
    result = OnlineLearner(s.cfg, s.store).round(s.buf)
    assert result.refused == "holdout" and "300 new events" in result.reason and "min_holdout=200" in result.reason

    s = Setting.make(tmp_path / "nan", ring_stream(30, 1500), "online.lr=1e38", "train.grad_clip=1e38")
    result = OnlineLearner(s.cfg, s.store).round(s.buf)
    assert result.refused == "non-finite", result.line()
    assert s.store.current() == s.v1

    learner = OnlineLearner(s.cfg, s.store)
    learner._train = lambda batches, seconds: (_ for _ in ()).throw(RuntimeError("kernel said no"))  # type: ignore[method-assign]
    result = learner.round(s.buf)
    assert result.refused == "non-finite" and "raised RuntimeError: kernel said no" in result.reason, result.line()


def test_a_rollback_makes_the_learner_start_again_from_the_serving_version(tmp_path: Path) -> None:
    s = Setting.make(tmp_path, ring_stream(30, 1500))
    learner = OnlineLearner(s.cfg, s.store)
    assert learner.round(s.buf).published
    s.store.set_current(s.v1)  # an operator's rollback
    fill(s.buf, ring_stream(30, 500, seed=3), s.history)
    result = learner.round(s.buf)
    assert learner.warm_starts == 2 and result.published and s.store.info(result.published).parent == s.v1


def test_while_serving_is_pinned_the_learner_publishes_but_does_not_serve(tmp_path: Path) -> None:
    s = Setting.make(tmp_path, ring_stream(30, 1500))
    s.store.set_current(s.v1, pin=True)  # an operator's rollback pins serving
    result = OnlineLearner(s.cfg, s.store).round(s.buf)
    assert result.published and s.store.current() == s.v1


def test_a_published_round_removes_the_weights_of_versions_beyond_keep_versions(tmp_path: Path) -> None:
    s = Setting.make(tmp_path, ring_stream(30, 1500), "model_store.keep_versions=1")
    published = OnlineLearner(s.cfg, s.store).round(s.buf).published
    assert published and s.store.current() == published
    assert s.store.collected(s.v1) and not s.store.collected(published)










def sparse_stream(users: int, events: int, share: float, seed: int) -> list[tuple[str, str]]:
    """Mostly items of a tail nobody can predict; a ``share`` of the events are a step on the ring of
    :func:`ring_stream`'s 40 items right after one, the only next items a model can know. The tail is sized so
    that every item is about as frequent: popularity tells nothing."""
    rng = random.Random(seed)
    tail = round(40 * (1 - share) / share)
    out: list[tuple[str, str]] = []
    while len(out) < events:
        u = rng.randrange(users)
        if rng.random() < share / 2:
            at = rng.randrange(40)
            out += [(f"u{u}", f"i{at + 1}"), (f"u{u}", f"i{(at + 1) % 40 + 1}")]
        else:
            out.append((f"u{u}", f"t{rng.randrange(tail)}"))
    return out[:events]


class ShuffledTargets(OnlineLearner):
    """A deliberately harmful round: every batch's next-item labels shuffled among its labelled positions."""

    def _batches(self, with_new, others, steps):  # type: ignore[no-untyped-def]
        for groups in super()._batches(with_new, others, steps):
            shuffled = []
            for tokens, labels in groups:
                labels = labels.clone()
                at = labels > 0
                labels[at] = labels[at][torch.randperm(int(at.sum()), generator=self.rng)]
                shuffled.append((tokens, labels))
            yield shuffled


def test_a_harmful_round_is_refused_on_a_sparse_stream_with_a_hit_rate_near_one_percent(tmp_path: Path) -> None:
    """1,000 held-out events with a dozen hits cannot tell, and an absolute margin of 0.005 would be half the
    metric: the first round's candidate is kept and trained on, the next round holds out enough events for the
    gate's hits (sized by the hit rate it measured) and refuses it, relative to serving's own figure."""
    s = Setting.make(tmp_path, ring_stream(30, 1500))
    v2 = OnlineLearner(s.cfg, s.store).round(s.buf).published  # serving knows the ring
    assert v2
    buf, history = EventBuffer(1000, 1000, s.cfg.model.max_len), {}
    events = sparse_stream(1000, 40_000, share=0.02, seed=5)
    fill(buf, events[:10_000], history)
    learner = ShuffledTargets(s.cfg, s.store)
    first = learner.round(buf)
    assert first.refused == "inconclusive" and first.gate["heldout"] == 1000, first.line()
    assert 0.005 < first.serving["HR@10"] < 0.02, "a sparse stream: serving hits about 1 % of held-out events"
    fill(buf, events[10_000:], history)
    second = learner.round(buf)
    assert second.gate["heldout"] == pytest.approx(first.gate["needed"], rel=0.01), second.line()
    assert second.gate["heldout"] > 5000
    assert second.refused == "gate" and second.published is None, second.line()
    assert second.candidate["NDCG@10"] < second.serving["NDCG@10"] * (1 - s.cfg.online.tolerance)
    assert s.store.current() == v2 and buf.trained == 0


def test_an_inconclusive_candidate_is_trained_further_and_judged_only_on_events_after_its_training_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.online

    verdicts: list[Verdict] = []

    def unsure_the_first_time(cand, serv, o):  # type: ignore[no-untyped-def]
        verdict = judge(cand, serv, o)
        if not verdicts:
            verdict.code, verdict.refusal = "inconclusive", "too few events to tell (this test says so)"
        verdicts.append(verdict)
        return verdict

    monkeypatch.setattr(trainer.online, "judge", unsure_the_first_time)
    s = Setting.make(tmp_path, ring_stream(30, 1500))
    learner = OnlineLearner(s.cfg, s.store)
    first = learner.round(s.buf)
    assert first.refused == "inconclusive" and first.published is None and s.buf.trained == 0
    assert learner.continued_to == 1350, "10 % of 1,500 held out: its training data ended at event 1,350"
    served = s.store.load(s.v1).model.state_dict()
    assert any(not torch.equal(served[k], v) for k, v in learner.model.state_dict().items()), "kept, not undone"
    fill(s.buf, ring_stream(30, 100, seed=1), s.history)
    learner.hit_rates.append(needed_hits(learner.o) / 1000)  # 1,000 wanted: more than the 250 events after 1,350,
    # without the bound it would reach back to 600
    second = learner.round(s.buf)
    assert second.published and second.gate["heldout"] == 250, second.line()
    assert s.buf.trained == 1350 and learner.warm_starts == 1 and learner.base is None


def test_a_continued_candidate_found_worse_goes_back_to_the_serving_weights(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.online

    codes = iter(["inconclusive", "gate"])

    def refuse(cand, serv, o):  # type: ignore[no-untyped-def]
        verdict = judge(cand, serv, o)
        verdict.code = next(codes)
        verdict.refusal = f"{verdict.code} (this test says so)"
        return verdict

    monkeypatch.setattr(trainer.online, "judge", refuse)
    s = Setting.make(tmp_path, ring_stream(30, 1500))
    learner = OnlineLearner(s.cfg, s.store)
    assert learner.round(s.buf).refused == "inconclusive"
    fill(s.buf, ring_stream(30, 400, seed=1), s.history)
    assert learner.round(s.buf).refused == "gate"
    served = s.store.load(s.v1).model.state_dict()
    assert all(torch.equal(served[k], v) for k, v in learner.model.state_dict().items()), "back to serving"
    assert learner.base is None and learner.continued_to == 0 and s.buf.trained == 0


def test_a_round_trains_at_least_as_long_as_the_rest_of_it_takes(tmp_path: Path) -> None:
    s = Setting.make(tmp_path, ring_stream(30, 1500), "online.max_train_seconds=0.01", "online.min_steps=1",
                     "online.max_steps=100000")
    learner = OnlineLearner(s.cfg, s.store)
    first = learner.round(s.buf)
    assert first.train_seconds < 0.3 and first.published, first.line()
    assert list(learner.gate_rates) == [pytest.approx(first.parts["gate"] / first.gate["heldout"])]
    assert list(learner.publish_seconds) == [pytest.approx(first.parts["publish"])]
    fill(s.buf, ring_stream(30, 400, seed=1), s.history)
    held = learner.holdout_size(s.buf.new_events)
    learner.gate_rates.append(0.4 / held)  # as if a recent gate had taken 0.4 s on this many events
    learner.publish_seconds.append(0.2)  # and a recent publish 0.2 s
    second = learner.round(s.buf)
    assert second.gate["heldout"] == held
    assert second.train_seconds >= 0.6 and second.steps > first.steps, second.line()
    assert second.train_seconds >= second.seconds - second.train_seconds - 0.05, "at least half of the round"
