"""LinRec: L2-normalised linear attention inside a SASRec Transformer (Liu et al., SIGIR 2023).

Per head, with d_h the head width (the official formulation):

    Qn = ELU(Q) / ||ELU(Q)||_2   (each query row)      Kn = ELU(K) / ||ELU(K)||_2   (each key row)
    out = Qn (Kn^T V) / sqrt(d_h)                     Kn^T V (d_h x d_h) first: O(L d^2), no softmax

Two forms, chosen by ``causal``:

* ``causal=True`` (default, what the stream serves): query t only sees keys s <= t, so

      S_t = S_{t-1} + Kn_t^T V_t          out_t = Qn_t S_t / sqrt(d_h)

  is a recurrence with a d_h x d_h state per head and layer: ``step`` is O(d^2) per event whatever the history.
  Trained like SASRec, with a loss at every position. Unlike a window, S_t sums the WHOLE history (positions
  beyond max_len reuse the last position embedding); that is the price of an O(1) state.
* ``causal=False``: the official unmasked form, kept for offline parity with the paper's code. Every position
  sees the whole input window (future items included), so it is trained as the official code trains it
  (loss at the last position only: ``loss_positions = "last"``); with a loss at every position it would read
  its own labels. Serving recomputes the window per event, like SASRec.

Deviations from the official code: padded keys are zeroed (the official code applies no padding mask, and left
padding would be visible), and an all-zero row is left zero instead of divided by its zero norm (NaN in the
official code). Such rows are real: a narrow model with heavy dropout (d_model 8, dropout 0.6) zeroes whole
tokens, and a norm clamped at 1e-12 gave them a 1e12-times gradient, inf after two layers, then NaN weights.
For every other row the two agree exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.sasrec import TransformerConfig, TransformerRec, WindowState, positions

CHUNK = 64


def elu_norm(x: torch.Tensor) -> torch.Tensor:
    """ELU(x) / ||ELU(x)||_2 per row; an all-zero row stays zero, with an ordinary gradient (no epsilon)."""
    e = F.elu(x)
    norm = e.norm(dim=-1, keepdim=True)
    return e / torch.where(norm > 0, norm, 1.0)


def causal_linear_attention(qn: torch.Tensor, kn: torch.Tensor, v: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """out_t = qn_t sum_{s<=t} kn_s^T v_s, computed in chunks.   [B, h, L, d_h] each -> [B, h, L, d_h].

    Within a chunk: (Qn Kn^T masked lower-triangular) V; across chunks: Qn @ S, S the running Kn^T V of all
    earlier chunks. O(L C d + L d^2) time, no L x L matrix for long sequences.
    """
    bsz, heads, length, dh = qn.shape
    n = -(-length // chunk)
    pad = n * chunk - length
    if pad:
        qn, kn, v = (F.pad(t, (0, 0, pad, 0)) for t in (qn, kn, v))
    q, k, vv = (t.reshape(bsz, heads, n, chunk, dh) for t in (qn, kn, v))
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    intra = ((q @ k.transpose(-1, -2)) * tril) @ vv  # [B, h, n, C, d_h]
    kv = k.transpose(-1, -2) @ vv  # per-chunk Kn^T V [B, h, n, d_h, d_h]
    before = torch.cumsum(kv, dim=2) - kv  # sum over earlier chunks only
    out = intra + q @ before
    return out.reshape(bsz, heads, n * chunk, dh)[:, :, pad:]


class LinearAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.scale = 1.0 / math.sqrt(d_model // heads)
        self.causal = causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        qn = elu_norm(q)
        kn = elu_norm(k) * mask[:, None, :, None].to(k.dtype)  # padded keys contribute nothing
        if self.causal:
            return causal_linear_attention(qn, kn, v) * self.scale
        return qn @ (kn.transpose(-1, -2) @ v) * self.scale  # official: Kn^T V first, over the whole window


@dataclass(frozen=True, kw_only=True)
class LinRecConfig(TransformerConfig):
    """LinRec's hyper-parameters. Linear attention has no attention weights, so it has no attention dropout."""

    name: ClassVar[str] = "linrec"
    file_keys: ClassVar[dict[str, str]] = {"causal": "linrec_causal"}
    retired: ClassVar[frozenset[str]] = frozenset({"attn_dropout"})  # model stores of format 1 recorded it

    causal: bool = True
    """True: the causal form the stream serves (a recurrent state, a loss at every position); False: the
    official unmasked form (loss at the last position; served by recomputing the window). Config file key
    ``model.linrec_causal``."""


class LinRecCausal(TransformerRec):
    """State: (S [B, layers, heads, d_h, d_h], count [B]) — running Kn^T V per layer and items seen."""

    config: LinRecConfig

    def make_attention(self) -> nn.Module:
        return LinearAttention(self.d_model, self.num_heads, causal=True)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def init_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.item_embedding.weight
        s = torch.zeros(batch_size, self.num_layers, self.num_heads, self.head_dim, self.head_dim,
                        dtype=p.dtype, device=p.device)
        return s, torch.zeros(batch_size, dtype=torch.long, device=p.device)

    def step(self, state: tuple[torch.Tensor, torch.Tensor], item: torch.Tensor
             ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        s, count = state
        mask = item > 0
        x = self.embed(item, count.clamp(max=self.max_len - 1))  # [B, d]
        new_s = []
        for i, layer in enumerate(self.layers):
            q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)) for t in
                       (layer.query(x), layer.key(x), layer.value(x)))  # [B, h, d_h]
            kn = elu_norm(k) * mask[:, None, None].to(k.dtype)
            s_i = s[:, i] + kn[..., :, None] * v[..., None, :]  # + Kn^T V: [B, h, d_h, d_h]
            context = (elu_norm(q)[..., None, :] @ s_i)[..., 0, :] * layer.attention.scale  # [B, h, d_h]
            x = layer.finish(context[:, :, None, :], x[:, None, :])[:, 0]
            new_s.append(s_i)
        return (torch.stack(new_s, dim=1), count + mask.long()), x

    def prefill(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = items > 0
        x = self.embed(items, positions(mask, self.max_len))
        states = []
        for layer in self.layers:
            q, k, v = layer.qkv(x)
            kn = elu_norm(k) * mask[:, None, :, None].to(k.dtype)
            states.append(kn.transpose(-1, -2) @ v)  # [B, h, d_h, d_h]
            x = layer.finish(layer.attention(q, k, v, mask), x)
        return torch.stack(states, dim=1), mask.long().sum(-1)

    def state_rows(self, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        s, count = state
        # the count only matters up to max_len (positions are capped), which keeps it exact in float16
        return torch.cat([s.flatten(1), count.clamp(max=self.max_len).to(s.dtype)[:, None]], dim=1)

    def state_from_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = rows[:, :-1].reshape(rows.shape[0], self.num_layers, self.num_heads, self.head_dim, self.head_dim)
        return s, rows[:, -1].round().long()


class LinRecUnmasked(WindowState, TransformerRec):
    """The official, unmasked form (whole-window attention); served by recomputing the stored window."""

    config: LinRecConfig
    loss_positions = "last"

    def make_attention(self) -> nn.Module:
        return LinearAttention(self.d_model, self.num_heads, causal=False)


def LinRec(config: LinRecConfig, num_items: int) -> TransformerRec:
    """Build LinRec in its causal (default) or official unmasked form, as ``config.causal`` says."""
    return (LinRecCausal if config.causal else LinRecUnmasked)(config, num_items)

