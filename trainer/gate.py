"""The online gate: is a candidate better than the serving model on what came next?

Both models rank every held-out event (trainer/buffer.py's ``holdout``: the most recent new events, never
trained on) from the same inputs: the user's items before the event, its last ``context`` masked as the worker
masks its window. The per-event NDCG@10 differences (candidate - serving) get a paired bootstrap percentile
interval at ``online.confidence``. :func:`judge` refuses the candidate when the interval lies below zero (worse
with confidence) or the mean difference is below ``-online.tolerance``, and says why, with numbers; whether the
weights are finite is the round's own check (trainer/online.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lrustream.kernel.config import OnlineConfig
from models.base import SeqRecModel
from models.vocab import Vocabulary
from trainer.buffer import HeldEvent
from trainer.evaluate import left_pad, ranks_of


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


def event_metrics(model: SeqRecModel, vocab: Vocabulary, held: list[HeldEvent], context: int,
                  batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(hit@10, NDCG@10) per held-out event, in order. Each event is ranked from the user's items before it,
    masking the last ``context`` of them as the worker masks its window; a target the vocabulary lacks is a
    miss.

    ONE forward pass over the window that ends before the last event of a run of a user's held-out events
    gives the hidden state before each event of the run, so a few thousand held-out events cost a few hundred
    rows. Runs are at most ``context // 2`` long, so every event is read with at least half the context."""
    oov = model.oov_index
    ids = [np.array([vocab.get(x) or oov for x in [*h.prefix[-context:], h.target]]) for h in held]
    rows = _rows_of_runs(held, max(1, context // 2))
    position = np.empty(len(held), dtype=np.int64)  # column of the hidden state that predicts each event
    for row in rows:
        for k, e in enumerate(row):
            position[e] = context - len(row) + k
    row_of = np.empty(len(held), dtype=np.int64)
    for r, row in enumerate(rows):
        row_of[row] = r
    tokens = left_pad([ids[row[-1]][:-1] for row in rows], context)
    model.eval()
    with torch.no_grad():
        hidden = torch.cat([model(tokens[s: s + batch_size]) for s in range(0, len(rows), batch_size)])
        h = hidden[torch.from_numpy(row_of), torch.from_numpy(position)]
        inputs = left_pad([i[:-1] for i in ids], context)
        targets = torch.tensor([vocab.get(x.target) or 0 for x in held])
        r = ranks_of(model.score(h).float(), inputs, targets.clamp(min=1))
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
    numbers: dict[str, float]  # held-out events, mean NDCG@10 difference, its interval and confidence
    refusal: str = ""  # why the candidate may not be published; empty when it may


def judge(cand: tuple[np.ndarray, np.ndarray], serv: tuple[np.ndarray, np.ndarray], o: OnlineConfig) -> Verdict:
    """The verdict on (hit@10, NDCG@10) per held-out event of the candidate and of the serving model."""
    diff = cand[1] - serv[1]
    low, high = paired_bootstrap(diff, o.bootstrap_samples, o.confidence)
    verdict = Verdict(candidate={"HR@10": float(cand[0].mean()), "NDCG@10": float(cand[1].mean())},
                      serving={"HR@10": float(serv[0].mean()), "NDCG@10": float(serv[1].mean())},
                      numbers={"heldout": len(diff), "diff": float(diff.mean()), "diff_low": low, "diff_high": high,
                               "confidence": o.confidence})
    worse = (f"held-out NDCG@10 {verdict.candidate['NDCG@10']:.4f} vs serving {verdict.serving['NDCG@10']:.4f} "
             f"on {len(diff)} events, difference {diff.mean():+.4f}")
    if high < 0:
        verdict.refusal = f"{worse}, {o.confidence:.0%} interval [{low:+.4f}, {high:+.4f}] below zero"
    elif diff.mean() < -o.tolerance:
        verdict.refusal = f"{worse} < -online.tolerance={o.tolerance}"
    return verdict
