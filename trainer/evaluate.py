"""The LRURec evaluation protocol: leave-one-out, full ranking over all items, input items masked.

For each user the model reads the input window (validation: the training part; test: training + validation,
both truncated to the last ``max_len`` items), scores every item, the items in that window and the padding id
are pushed to the bottom, and the held-out item's rank gives NDCG@k, Recall@k (= HR@k) and MRR.

Full ranking with bounded memory: :func:`score_ranks` scores a few rows at a time, at most ``SCORE_BUDGET``
scores at once (64 MB of float32), however large the catalogue: 16 users at a time at 1,000,000 items, all of an
evaluation batch at a few thousand. The online gate ranks its held-out events the same way (trainer/gate.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models import SeqRecModel

KS = (10, 20)
MASKED = -1e9
SCORE_BUDGET = 1 << 24  # scores held at once by score_ranks


def left_pad(seqs: Sequence[np.ndarray], length: int) -> torch.Tensor:
    """Last ``length`` items of each sequence, left-padded with 0: [len(seqs), length]."""
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for row, seq in enumerate(seqs):
        tail = seq[-length:]
        if len(tail):
            out[row, length - len(tail):] = tail
    return torch.from_numpy(out)


def ranks_of(scores: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target among all items after masking the input window and padding.

    An item ranks above the target unless its score is <= the target's: a NaN score ranks above, and a NaN
    target ranks last (a diverged model misses; with ``>`` it would have ranked every target first)."""
    return _ranks(scores.clone(), inputs, targets)


def _ranks(scores: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`ranks_of`, masking ``scores`` in place."""
    inputs = torch.where(inputs < scores.shape[1], inputs, 0)  # the OOV id has no column
    scores.scatter_(1, inputs, MASKED)  # the window's items (and id 0 through the padding) drop to the bottom
    scores[:, 0] = MASKED
    target_scores = scores.gather(1, targets[:, None])
    return ((~(scores <= target_scores)).sum(1) + 1).clamp(max=scores.shape[1])


def score_ranks(model: SeqRecModel, hidden: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                budget: int | None = None) -> torch.Tensor:
    """``ranks_of(model.score(hidden), inputs, targets)`` over the whole catalogue, scored a few rows at a time so
    that at most ``budget`` scores (default ``SCORE_BUDGET``) exist at once.   hidden [U, d], inputs [U, L],
    targets [U]."""
    rows = max(1, (budget or SCORE_BUDGET) // (model.num_items + 1))
    out = [_ranks(model.score(hidden[s: s + rows]).float(), inputs[s: s + rows], targets[s: s + rows])
           for s in range(0, len(hidden), rows)]
    return torch.cat(out) if out else targets.new_empty(0)


def metrics_from_ranks(ranks: torch.Tensor) -> dict[str, float]:
    r = ranks.double()
    out: dict[str, float] = {}
    for k in KS:
        hit = r <= k
        out[f"NDCG@{k}"] = float(torch.where(hit, 1.0 / torch.log2(r + 1), 0.0).mean())
        out[f"Recall@{k}"] = float(hit.double().mean())
    out["MRR"] = float((1.0 / r).mean())
    return out


@torch.no_grad()
def evaluate(model: SeqRecModel, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 256,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """inputs [U, L] left-padded model ids, targets [U] -> metric dict (means over users)."""
    was_training = model.training
    model.eval()
    ranks = []
    for start in range(0, len(targets), batch_size):
        x = inputs[start: start + batch_size].to(device)
        y = targets[start: start + batch_size].to(device)
        ranks.append(score_ranks(model, model.last_hidden(x), x, y).cpu())
    model.train(was_training)
    return metrics_from_ranks(torch.cat(ranks)) if ranks else {}
