"""The training loss: full-softmax cross-entropy over the item catalogue, computed in row chunks on CPU.

``sequence_loss`` is what every trainer (offline and online) minimises: the mean cross-entropy over ALL items
(the padding id excluded) at every labelled position of a batch, or at the last position only for models that
see the whole window (``loss_positions == "last"``); ``catalogue_cross_entropy`` computes it.

The logits of a training batch are big (ML-1M: 25,600 positions x 3,417 items = 350 MB). Materialising them
costs more in memory traffic and page faults than in arithmetic, so on CPU the loss is computed chunk by chunk
and the backward pass recomputes each chunk's logits instead of storing them: the same loss and gradients
(checked against F.cross_entropy in the tests), roughly half the time on a 2-core machine. On GPUs the plain
path is already fast and is used as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models import SeqRecModel

CPU_CHUNK = 512


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                chunk: int) -> torch.Tensor:
        lse = h.new_empty(h.shape[0])
        total = h.new_zeros(())
        buf = h.new_empty(min(chunk, h.shape[0]), weight.shape[0])
        for s in range(0, h.shape[0], chunk):
            hc = h[s: s + chunk]
            logits = torch.addmm(bias, hc, weight.T, out=buf[: hc.shape[0]])
            logits[:, 0] = float("-inf")  # padding id is never a valid prediction
            torch.logsumexp(logits, 1, out=lse[s: s + chunk])
            total += lse[s: s + chunk].sum() - logits.gather(1, labels[s: s + chunk, None]).sum()
        ctx.save_for_backward(h, weight, bias, labels, lse)
        ctx.chunk = chunk
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
            p[:, 0] = float("-inf")
            p.sub_(lse[s: s + chunk, None]).exp_()  # softmax
            p[rows[:n], labels[s: s + chunk]] -= 1.0  # minus one-hot
            p.mul_(scale)
            torch.mm(p, weight, out=g_h[s: s + chunk])
            g_w.addmm_(p.T, hc)
            g_b.add_(p.sum(0))
        return g_h, g_w, g_b, None, None


def catalogue_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            labels: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """mean_i CE(h_i @ weight.T + bias, labels_i), column 0 excluded.   h [M, d], weight [V, d], labels [M]."""
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    if h.device.type != "cpu" and chunk is None:
        logits = torch.addmm(bias, h, weight.T)
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, labels)
    return _ChunkedCE.apply(h, weight, bias, labels, chunk or CPU_CHUNK)


def sequence_loss(model: SeqRecModel, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Full-softmax cross-entropy; logits only where there is a label (padding costs nothing)."""
    emb, bias = model.item_table()
    n = model.num_items + 1  # the OOV row is never a target
    weight, bias = emb[:n], None if bias is None else bias[:n]
    if model.loss_positions == "last":
        return catalogue_cross_entropy(model.last_hidden(tokens), weight, bias, labels)
    hidden = model(tokens)
    sel = labels > 0
    return catalogue_cross_entropy(hidden[sel], weight, bias, labels[sel])
