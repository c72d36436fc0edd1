"""SASRec: causal softmax self-attention (Kang & McAuley, ICDM 2018), the baseline users would otherwise pick.

Layout as RecBole's SASRec (which LinRec builds on), post-LayerNorm Transformer:

    x_0 = Dropout(LayerNorm(E[items] + P[positions]))
    per layer:  a = LayerNorm(Dropout(W_o Attention(W_q x, W_k x, W_v x)) + x)
                x = LayerNorm(Dropout(W_2 GELU(W_1 a)) + a)
    score(h) = h @ E^T                                     tied embedding, no bias

Positions count from the user's first real item (0, 1, 2, ...), capped at max_len - 1, so left padding is
invisible: a sequence gives the same hidden states however much padding precedes it.

Serving (``step``): softmax attention has no fixed-size recurrent state, so SASRec keeps the last ``max_len``
item ids as its state and RECOMPUTES the forward pass over that window for every event: O(L^2 d) per event,
the cost the recurrent models avoid. (A KV cache would make it O(L d) per event but needs 2 x layers x L x d
floats per user in the state store, and would diverge from the windowed forward once L exceeds max_len.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.base import SeqRecConfig, SeqRecModel, grow_embedding

LN_EPS = 1e-12


def positions(mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """0-based index of each real item counted from the first real item; padding gets 0."""
    return (mask.long().cumsum(-1) - 1).clamp(0, max_len - 1) * mask


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, d] -> [B, heads, L, d/heads]."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, d_h] -> [B, L, heads * d_h]."""
    return x.transpose(-3, -2).flatten(-2)


class SoftmaxAttention(nn.Module):
    """Causal scaled dot-product attention over real keys."""

    def __init__(self, d_model: int, heads: int, attn_dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = q.shape[-2]
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        allowed = causal & mask[:, None, None, :]  # [B, 1, L, L]: past-or-present real keys
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=q.device)  # padding queries: no NaN
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                              dropout_p=self.attn_dropout if self.training else 0.0)


class TransformerLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float, attention: nn.Module) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.attention = attention
        self.dense = nn.Linear(d_model, d_model)
        self.attn_layer_norm = nn.LayerNorm(d_model, eps=LN_EPS)
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.ffn_layer_norm = nn.LayerNorm(d_model, eps=LN_EPS)
        self.dropout = nn.Dropout(dropout)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (split_heads(self.query(x), self.heads), split_heads(self.key(x), self.heads),
                split_heads(self.value(x), self.heads))

    def finish(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, LayerNorm, then the feed-forward sub-layer."""
        a = self.attn_layer_norm(self.dropout(self.dense(merge_heads(context))) + x)
        return self.ffn_layer_norm(self.dropout(self.w_2(F.gelu(self.w_1(a)))) + a)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.finish(self.attention(*self.qkv(x), mask), x)


@dataclass(frozen=True, kw_only=True)
class TransformerConfig(SeqRecConfig):
    """What the Transformer skeleton shared by SASRec and LinRec reads besides the common fields."""

    num_heads: int = 2
    """Attention heads per layer; must divide ``d_model``."""


@dataclass(frozen=True, kw_only=True)
class SASRecConfig(TransformerConfig):
    """SASRec's hyper-parameters."""

    name: ClassVar[str] = "sasrec"

    attn_dropout: float = 0.2
    """Dropout on the attention weights while training."""


class TransformerRec(SeqRecModel):
    """Shared skeleton of SASRec and LinRec; subclasses choose the attention."""

    config: TransformerConfig

    def __init__(self, config: TransformerConfig, num_items: int) -> None:
        super().__init__(config, num_items)
        d_model, num_heads, dropout, max_len = config.d_model, config.num_heads, config.dropout, config.max_len
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of num_heads={num_heads}")
        self.num_layers, self.num_heads = config.num_layers, num_heads
        self.item_embedding = nn.Embedding(num_items + 2, d_model, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, d_model)
        self.embed_layer_norm = nn.LayerNorm(d_model, eps=LN_EPS)
        self.embed_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList([
            TransformerLayer(d_model, num_heads, 4 * d_model, dropout, self.make_attention())
            for _ in range(self.num_layers)
        ])
        self.apply(self._init_module)

    def make_attention(self) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def _init_module(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            module.weight.data.normal_(0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()

    def item_table(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.item_embedding.weight, None

    def embed(self, items: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.embed_dropout(self.embed_layer_norm(self.item_embedding(items) + self.position_embedding(pos)))

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        mask = items > 0
        x = self.embed(items, positions(mask, self.max_len))
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def grow_items(self, new_num_items: int) -> None:
        if new_num_items <= self.num_items:
            return
        with torch.no_grad():
            weight = grow_embedding(self.item_embedding.weight.data, self.num_items, new_num_items)
        self.item_embedding = nn.Embedding.from_pretrained(weight, freeze=False, padding_idx=0)
        self.num_items = new_num_items


class WindowState:
    """Serving by recomputation: the state is the last max_len item ids [B, max_len], left-padded."""

    state_is_ids = True

    def init_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(batch_size, self.max_len, dtype=torch.long, device=self._reference_param().device)

    def step(self, state: torch.Tensor, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shifted = torch.cat([state[:, 1:], item[:, None]], dim=1)
        state = torch.where((item > 0)[:, None], shifted, state)
        return state, self(state)[:, -1]

    def prefill(self, items: torch.Tensor) -> torch.Tensor:
        items = items[:, -self.max_len:]
        return F.pad(items, (self.max_len - items.shape[1], 0))

    def state_rows(self, state: torch.Tensor) -> torch.Tensor:
        return state

    def state_from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.long()


class SASRec(WindowState, TransformerRec):
    config: SASRecConfig

    def make_attention(self) -> nn.Module:
        return SoftmaxAttention(self.d_model, self.num_heads, self.config.attn_dropout)

