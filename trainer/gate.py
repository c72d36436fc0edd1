"""The online gate: is a candidate better than the serving model on what came next?

Both models rank every held-out event (trainer/buffer.py's ``holdout``: the most recent new events, never
trained on) from the same inputs: the user's items before the event, its last ``context`` masked as the worker
masks its window. The per-event NDCG@10 differences (candidate - serving) get a paired bootstrap percentile
interval at ``online.confidence``.

The decision is relative to the serving model's own figure, so it means the same on a dense stream (NDCG@10
near 0.15) and a sparse one (near 0.01): the margin is ``online.tolerance`` times the serving model's held-out
NDCG@10. :func:`judge` refuses with code ``gate`` a candidate worse with confidence (the interval lies below
zero) and publishes one not worse by more than the margin with confidence (the interval lies above ``-margin``),
however few the events. Between the two, the held-out events must hold enough of the serving model's hits to
tell (:func:`needed_hits`): with fewer it refuses with ``inconclusive``; with enough, it refuses with ``gate`` a
candidate whose mean difference is below ``-margin`` and publishes the others. Every refusal says why, with
numbers; whether the weights are finite is the round's own check (trainer/online.py).

How many held-out events are enough follows from the stream's hit rate, measured, not set: to see a drop of
``online.detectable_drop`` of the hit rate with probability ``online.power`` at ``online.confidence``, the
held-out events must hold about :func:`needed_hits` hits of the serving model (150 at the defaults), so a round
holds out :func:`needed_heldout` events: about 750 on a stream hit one time in five, 15,000 on one hit one time in
a hundred. A candidate refused as ``inconclusive`` is trained further by the next round and judged on that many
(trainer/online.py), so evidence accumulates across rounds. What a gate cannot see on a few thousand events,
the live watch sees on the served stream (trainer/live.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

from lrustream.kernel.config import OnlineConfig
from models.base import SeqRecModel
from models.vocab import Vocabulary
from trainer.buffer import HeldEvent
from trainer.evaluate import left_pad, score_ranks


def _rows_of_runs(held: list[HeldEvent], per_row: int) -> list[list[int]]:
    """Held-out events grouped into rows: each row a run of at most ``per_row`` consecutive events of one user
    (a user's held-out events are consecutive in its history: every later event of the user is held out too)."""
    rows: list[list[int]] = []
    open_row: dict[str, list[int]] = {}
    for e, h in enumerate(held):
        row = open_row.get(h.user)
        if row is None or len(row) >= per_row:
            row = open_row[h.user] = []
            rows.append(row)
        row.append(e)
    return rows


def _hidden_before(model: SeqRecModel, tokens: list[np.ndarray], rows: list[list[int]], events: int,
                   batch_size: int) -> torch.Tensor:
    """[events, d]: the model's output before each held-out event. Row ``r`` reads ``tokens[r]`` (the items before
    the last event of its run ``rows[r]``); the output before the run's ``k``-th event is the one ``len(run) - k``
    columns from the end. Rows go through the model sorted by length, each batch padded only to its longest:
    every model here is causal and reads no padding, so the outputs are those of one padded batch."""
    order = sorted(range(len(rows)), key=lambda r: len(tokens[r]))
    out: torch.Tensor | None = None
    for s in range(0, len(order), batch_size):
        batch = order[s: s + batch_size]
        width = max(1, max(len(tokens[r]) for r in batch))
        hidden = model(left_pad([tokens[r] for r in batch], width))
        if out is None:
            out = hidden.new_empty(events, hidden.shape[-1])
        for b, r in enumerate(batch):
            run = rows[r]
            out[run] = hidden[b, width - len(run):]
    assert out is not None
    return out


def event_metrics(model: SeqRecModel, vocab: Vocabulary, held: list[HeldEvent], context: int,
                  batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(hit@10, NDCG@10) per held-out event, in order. Each event is ranked from the user's items before it,
    masking the last ``context`` of them as the worker masks its window; a target the vocabulary lacks is a
    miss.

    ONE forward pass over the window that ends before the last event of a run of a user's held-out events
    gives the hidden state before each event of the run, so a few thousand held-out events cost a few hundred
    rows. Runs are at most ``context // 2`` long, so every event is read with at least half the context. Every
    event is ranked over the whole catalogue, a few events at a time (trainer/evaluate.py ``score_ranks``)."""
    oov = model.oov_index
    ids = [np.array([vocab.get(x) or oov for x in [*h.prefix[-context:], h.target]]) for h in held]
    rows = _rows_of_runs(held, max(1, context // 2))
    model.eval()
    with torch.no_grad():
        h = _hidden_before(model, [ids[row[-1]][:-1] for row in rows], rows, len(held), batch_size)
        inputs = left_pad([i[:-1] for i in ids], context)
        targets = torch.tensor([vocab.get(x.target) or 0 for x in held])
        r = score_ranks(model, h, inputs, targets.clamp(min=1))
        r = torch.where(targets > 0, r, model.num_items + 1).double().numpy()
    hit = r <= 10
    return hit.astype(float), np.where(hit, 1.0 / np.log2(r + 1), 0.0)


def paired_bootstrap(diff: np.ndarray, samples: int, confidence: float, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of paired differences, resampling events with replacement."""
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for s in range(0, samples, 100):
        idx = rng.integers(0, len(diff), size=(min(100, samples - s), len(diff)))
        means[s: s + len(idx)] = diff[idx].mean(1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


@dataclass
class Verdict:
    """The gate's numbers on the held-out events, and its decision."""

    candidate: dict[str, float]  # the candidate's HR@10 and NDCG@10
    serving: dict[str, float]  # the serving model's
    numbers: dict[str, float]  # held-out events, mean NDCG@10 difference, its interval, margin, spread
    refusal: str = ""  # why the candidate may not be published; empty when it may
    code: str = ""  # "gate" (worse) or "inconclusive" (too few events to tell); empty when it may be published


def z_interval(o: OnlineConfig) -> float:
    """Standard errors from the middle to either end of a two-sided interval at ``o.confidence``."""
    return NormalDist().inv_cdf((1 + o.confidence) / 2)


def z_sum(o: OnlineConfig) -> float:
    """Standard errors between the two hypotheses: the interval's at ``o.confidence`` plus the power's."""
    return z_interval(o) + NormalDist().inv_cdf(o.power)


def needed_hits(o: OnlineConfig) -> int:
    """Hits of the serving model that tell its hit rate ``p`` from ``p * (1 - o.detectable_drop)`` with probability
    ``o.power`` at ``o.confidence`` (two counts of a rare event: variance about their sum)."""
    d = o.detectable_drop
    return math.ceil(z_sum(o) ** 2 * (2 - d) / d**2)


def needed_heldout(hit_rate: float, o: OnlineConfig) -> int | None:
    """Held-out events that hold :func:`needed_hits` at the serving model's ``hit_rate`` (None when it is 0)."""
    return math.ceil(needed_hits(o) / hit_rate) if hit_rate > 0 else None


def judge(cand: tuple[np.ndarray, np.ndarray], serv: tuple[np.ndarray, np.ndarray], o: OnlineConfig) -> Verdict:
    """The verdict on (hit@10, NDCG@10) per held-out event of the candidate and of the serving model."""
    diff = cand[1] - serv[1]
    low, high = paired_bootstrap(diff, o.bootstrap_samples, o.confidence)
    serving_ndcg = float(serv[1].mean())
    margin = o.tolerance * serving_ndcg
    verdict = Verdict(candidate={"HR@10": float(cand[0].mean()), "NDCG@10": float(cand[1].mean())},
                      serving={"HR@10": float(serv[0].mean()), "NDCG@10": serving_ndcg},
                      numbers={"heldout": len(diff), "diff": float(diff.mean()), "diff_low": low, "diff_high": high,
                               "confidence": o.confidence, "margin": margin, "diff_sd": float(diff.std())})
    if (needed := needed_heldout(verdict.serving["HR@10"], o)) is not None:
        verdict.numbers["needed"] = float(needed)
    hits, enough = int(serv[0].sum()), needed_hits(o)
    said = (f"held-out NDCG@10 {verdict.candidate['NDCG@10']:.4f} vs serving {serving_ndcg:.4f} on {len(diff)} "
            f"events, difference {diff.mean():+.4f}, {o.confidence:.0%} interval [{low:+.4f}, {high:+.4f}]")
    if high < 0:
        verdict.code, verdict.refusal = "gate", f"{said} below zero"
    elif low >= -margin:  # not worse by more than the margin, with confidence: however few the hits
        pass
    elif hits < enough:
        verdict.code, verdict.refusal = "inconclusive", (f"{said}; the serving model hit {hits} of them, {enough} "
                                                         f"tell a drop of online.detectable_drop={o.detectable_drop}")
    elif diff.mean() < -margin:
        verdict.code, verdict.refusal = "gate", f"{said}: mean below -{margin:.4f} (online.tolerance={o.tolerance} " \
                                                f"of serving)"
    return verdict
