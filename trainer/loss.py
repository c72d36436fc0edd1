"""The training loss: softmax cross-entropy over the item catalogue, full or sampled, computed in row chunks on CPU.

``sequence_loss`` is what every trainer (offline and online) minimises: the mean cross-entropy at every labelled
position of a batch, or at the last position only for models that see the whole window
(``loss_positions == "last"``). Which softmax it takes depends on the catalogue's size N:

* **Full** (N <= ``train.sampled_softmax_above``, or without a :class:`Sampling`): over ALL items, the padding
  id excluded (``catalogue_cross_entropy``).
* **Sampled** (N above the threshold): over a shared candidate set per batch (``sampled_cross_entropy``), so a
  step's cost follows the batch, not the catalogue. The item table and its bias then receive sparse gradients
  (the rows the batch read or scored), which trainer/optim.py applies to those rows only.

The sampled estimator. For a batch with targets ``y_i`` the candidates are

* B, the batch's distinct targets (in-batch negatives): given the batch each is a candidate with certainty, an
  expected count of 1, so its logQ correction is log 1 = 0;
* S, ``train.negatives`` draws uniform over items 1..N with replacement: each item's expected count is K/N, and
  log(K/N) is subtracted from every drawn logit (the logQ correction). A draw of an item already in B, which
  includes every row's own target (an accidental hit), is masked: B counts that item once already.

For every row, exp(s_y) + sum over B minus y of exp(s_j) + sum over unmasked draws of exp(s_d) N/K has the full
partition function sum_j exp(s_j) as its expectation over the draws, whatever the batch: the sampled loss is a
consistent estimate of the full one (the log of an unbiased estimate of its normaliser), and equals it when
K >= N, where every item is drawn once (expected count 1, correction 0). The draws are uniform rather than
proportional to popularity because the in-batch targets already are the popular items, counted exactly; uniform
draws reach the long tail that popularity draws would seldom visit, need no item counts (the online vocabulary
grows, and new items have none) and cost O(K) whatever N.

The logits of a full-softmax batch are big (ML-1M: 25,600 positions x 3,417 items = 350 MB). Materialising them
costs more in memory traffic and page faults than in arithmetic, so on CPU the loss is computed chunk by chunk
and the backward pass recomputes each chunk's logits instead of storing them: the same loss and gradients
(checked against F.cross_entropy in the tests), roughly half the time on a 2-core machine. On GPUs the plain
path is already fast and is used as is. The sampled loss goes through the same code over its candidates.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lrustream.kernel.config import TrainConfig
from models import SeqRecModel

CPU_CHUNK = 512


@dataclass(frozen=True)
class Sampling:
    """When the loss is a sampled softmax and how many items it draws (``train.sampled_softmax_above``,
    ``train.negatives``)."""

    above: int
    negatives: int

    @classmethod
    def of(cls, cfg: TrainConfig) -> Sampling:
        return cls(above=cfg.sampled_softmax_above, negatives=cfg.negatives)

    def applies(self, num_items: int) -> bool:
        return num_items > self.above


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                chunk: int, mask_first: bool) -> torch.Tensor:
        lse = h.new_empty(h.shape[0])
        total = h.new_zeros(())
        buf = h.new_empty(min(chunk, h.shape[0]), weight.shape[0])
        for s in range(0, h.shape[0], chunk):
            hc = h[s: s + chunk]
            logits = torch.addmm(bias, hc, weight.T, out=buf[: hc.shape[0]])
            if mask_first:
                logits[:, 0] = float("-inf")  # padding id is never a valid prediction
            torch.logsumexp(logits, 1, out=lse[s: s + chunk])
            total += lse[s: s + chunk].sum() - logits.gather(1, labels[s: s + chunk, None]).sum()
        ctx.save_for_backward(h, weight, bias, labels, lse)
        ctx.chunk, ctx.mask_first = chunk, mask_first
        return total / h.shape[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight, bias, labels, lse = ctx.saved_tensors
        chunk = ctx.chunk
        g_h, g_w, g_b = torch.empty_like(h), torch.zeros_like(weight), torch.zeros_like(bias)
        buf = h.new_empty(min(chunk, h.shape[0]), weight.shape[0])
        rows = torch.arange(buf.shape[0], device=h.device)
        scale = grad / h.shape[0]
        for s in range(0, h.shape[0], chunk):
            hc = h[s: s + chunk]
            n = hc.shape[0]
            p = torch.addmm(bias, hc, weight.T, out=buf[:n])
            if ctx.mask_first:
                p[:, 0] = float("-inf")
            p.sub_(lse[s: s + chunk, None]).exp_()  # softmax
            p[rows[:n], labels[s: s + chunk]] -= 1.0  # minus one-hot
            p.mul_(scale)
            torch.mm(p, weight, out=g_h[s: s + chunk])
            g_w.addmm_(p.T, hc)
            g_b.add_(p.sum(0))
        return g_h, g_w, g_b, None, None, None


def _cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                   chunk: int | None, mask_first: bool) -> torch.Tensor:
    """mean_i CE(h_i @ weight.T + bias, labels_i); column 0 excluded when ``mask_first``."""
    if h.device.type != "cpu" and chunk is None:
        logits = torch.addmm(bias, h, weight.T)
        if mask_first:
            logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, labels)
    return _ChunkedCE.apply(h, weight, bias, labels, chunk or CPU_CHUNK, mask_first)


def catalogue_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            labels: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """mean_i CE(h_i @ weight.T + bias, labels_i), column 0 excluded.   h [M, d], weight [V, d], labels [M]."""
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    return _cross_entropy(h, weight, bias, labels, chunk, mask_first=True)


# ----- the sampled softmax -------------------------------------------------------------------------------------
class _SparseRows(torch.autograd.Function):
    """``table[rows]`` whose gradient is a sparse tensor holding those rows only (no table-sized gradient)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.shape = table.shape
        return table.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(rows[None], grad, ctx.shape, check_invariants=False), None


def sparse_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``table[rows]``, its gradient sparse (rows may repeat: their gradients add up)."""
    return _SparseRows.apply(table, rows)


def uniform_negatives(num_items: int, k: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """(``k`` draws uniform over items 1..num_items with replacement, the log of each item's expected count k/N);
    every item once and log 1 = 0 when ``k >= num_items``. Draws from torch's global generator, which training
    checkpoints save, so a resumed run draws what an uninterrupted one would."""
    if k >= num_items:
        return torch.arange(1, num_items + 1, device=device), 0.0
    return torch.randint(1, num_items + 1, (k,), device=device), math.log(k / num_items)


def sampled_cross_entropy(h: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                          negatives: torch.Tensor, log_count: float, chunk: int | None = None) -> torch.Tensor:
    """The sampled-softmax estimate of ``catalogue_cross_entropy(h, table, bias, labels)`` (module docstring):
    candidates are the distinct ``labels`` (correction 0) and the ``negatives`` (drawn item ids, each corrected
    by ``log_count``, masked when it is one of the labels). h [M, d], table [V, d], labels [M] in 1..V-1.
    ``table`` and ``bias`` get sparse gradients. Logits are [M, distinct labels + len(negatives)]."""
    batch_items, label_column = torch.unique(labels, return_inverse=True)
    candidates = torch.cat([batch_items, negatives])
    correction = torch.cat([torch.zeros(len(batch_items), dtype=h.dtype, device=h.device),
                            torch.where(torch.isin(negatives, batch_items), math.inf, log_count).to(h.dtype)])
    weight = sparse_rows(table, candidates)
    cand_bias = -correction if bias is None else sparse_rows(bias, candidates) - correction
    return _cross_entropy(h, weight, cand_bias, label_column, chunk, mask_first=False)


@contextlib.contextmanager
def sparse_item_lookup(model: SeqRecModel) -> Iterator[None]:
    """The model's own lookups in its item table give sparse gradients while inside (nn.Embedding's ``sparse``,
    read when the lookup runs)."""
    table, _ = model.item_table()
    lookups = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is table and not m.sparse]
    for m in lookups:
        m.sparse = True
    try:
        yield
    finally:
        for m in lookups:
            m.sparse = False


def _outputs(model: SeqRecModel, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden state at each labelled position [M, d], its label [M])."""
    if model.loss_positions == "last":
        return model.last_hidden(tokens), labels
    hidden = model(tokens)
    sel = labels > 0
    return hidden[sel], labels[sel]


def sequence_loss(model: SeqRecModel, tokens: torch.Tensor, labels: torch.Tensor,
                  sampling: Sampling | None = None) -> torch.Tensor:
    """Cross-entropy at the labelled positions (padding costs nothing): the full softmax, or the sampled one when
    ``sampling`` applies to the model's catalogue."""
    if sampling is not None and sampling.applies(model.num_items):
        return _sampled_loss(model, tokens, labels, sampling.negatives)
    emb, bias = model.item_table()
    n = model.num_items + 1  # the OOV row is never a target
    weight, bias = emb[:n], None if bias is None else bias[:n]
    h, y = _outputs(model, tokens, labels)
    return catalogue_cross_entropy(h, weight, bias, y)


def _sampled_loss(model: SeqRecModel, tokens: torch.Tensor, labels: torch.Tensor, negatives: int) -> torch.Tensor:
    table, bias = model.item_table()
    with sparse_item_lookup(model):
        h, y = _outputs(model, tokens, labels)
    drawn, log_count = uniform_negatives(model.num_items, negatives, h.device)
    return sampled_cross_entropy(h, table, bias, y, drawn, log_count)
