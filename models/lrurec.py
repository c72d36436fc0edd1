"""LRURec: Linear Recurrent Units for sequential recommendation (Yue et al., WSDM 2024).

The model, as the official code builds it (facts in ../shared/reference/NOTES.md):

    x_0 = LayerNorm(Dropout(E[items]))                                  item embedding, no positions
    per block:   LRU layer   h_t = lambda * h_{t-1} + gamma * (B x_t + b)     complex, diagonal lambda
                             y_t = LayerNorm(Dropout(Re(C h_t + c)) + x_t)
                 FFN         z_t = LayerNorm(Dropout(W2 Dropout(GELU(W1 y_t))) + y_t)
    score(h) = h @ E^T + item_bias                                      tied embedding

    lambda = exp(-exp(nu_log) + i exp(theta_log)),  gamma = exp(gamma_log)    (3 x H learnable logs)

The recurrence is linear and time-invariant, so training computes all positions at once with a chunked
parallel scan (no Python loop over time), and serving advances one event with exactly the same maths in O(1).
Padding (item 0) contributes nothing to the recurrence: its input is zeroed, so h stays 0 until the first
real item and left padding never leaks into real positions.

Complex numbers are carried as (re, im) pairs of real tensors: the same algebra, faster kernels on CPU and
GPU, and bit-stable under batching. Shapes: B batch, L length, d model width, H = 2d complex state size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.base import MIN_ROWS, SeqRecConfig, SeqRecModel, grow_embedding, truncated_normal_

SCAN_CHUNK = {"cpu": 16, "cuda": 256}  # GPUs prefer one big product to a deeper recursion of small ones


# ----- the scan ------------------------------------------------------------------------------------------------
def lambda_powers(nu: torch.Tensor, theta: torch.Tensor, n: int) -> torch.Tensor:
    """lambda^k for k = 0..n-1 as a [n, 2, H] (re, im) tensor: |lambda|^k = exp(-k nu), angle k theta."""
    k = torch.arange(n, device=nu.device, dtype=nu.dtype)[:, None]
    mag, ang = torch.exp(-k * nu), k * theta
    return torch.stack([mag * torch.cos(ang), mag * torch.sin(ang)], dim=1)


def toeplitz(nu: torch.Tensor, theta: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Transposed Toeplitz blocks T[h, j, i] = lambda_h^(i-j) for i >= j, else 0: ([H, C, C], [H, C, C]).

    Built elementwise (no gather), so its backward is elementwise too: a gather's backward would scatter-add
    C^2 H values into C H slots, which serialises on GPUs.
    """
    idx = torch.arange(chunk, device=nu.device, dtype=nu.dtype)
    lag = idx[None, :] - idx[:, None]  # [j, i] -> i - j
    keep = lag >= 0
    lag = lag.clamp(min=0)[None]  # [1, C, C]
    mag = torch.exp(-lag * nu[:, None, None])
    ang = lag * theta[:, None, None]
    return torch.where(keep, mag * torch.cos(ang), 0.0), torch.where(keep, mag * torch.sin(ang), 0.0)


def complex_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(re, im) pairs along dim -2: [.., 2, H] x [.., 2, H] -> [.., 2, H]."""
    are, aim = a.unbind(-2)
    bre, bim = b.unbind(-2)
    return torch.stack([are * bre - aim * bim, are * bim + aim * bre], dim=-2)


def lru_scan(u_re: torch.Tensor, u_im: torch.Tensor, nu: torch.Tensor, theta: torch.Tensor,
             chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = lambda h_{t-1} + u_t for every t, h_{-1} = 0, channel-major: u_re, u_im [H, M, L] -> h_re, h_im.

    Chunked parallel scan: within chunks of C steps the recurrence is a lower-triangular Toeplitz matrix
    T[i, j] = lambda^(i-j) per channel, applied as batched matmuls over the channels (4 real products for the
    complex one); the end states of the chunks follow the same recurrence with lambda^C, solved by recursing
    on them; each chunk then adds lambda^(i+1) times the state it starts from. Work O(L C), depth O(log_C L).
    Channel-major layout keeps every product and update on contiguous memory (no transposes of the state).
    """
    hid, m, length = u_re.shape
    chunk = chunk or SCAN_CHUNK.get(u_re.device.type, 16)
    n = -(-length // chunk)
    pad = n * chunk - length
    if pad:  # zeros in front change nothing: h stays 0 through them
        u_re, u_im = F.pad(u_re, (pad, 0)), F.pad(u_im, (pad, 0))
    t_re, t_im = toeplitz(nu, theta, chunk)  # [H, C(j), C(i)]: right-multiplying applies the recurrence
    ur, ui = u_re.reshape(hid, m * n, chunk), u_im.reshape(hid, m * n, chunk)
    h_re = (torch.bmm(ur, t_re) - torch.bmm(ui, t_im)).view(hid, m, n, chunk)
    h_im = (torch.bmm(ur, t_im) + torch.bmm(ui, t_re)).view(hid, m, n, chunk)
    if n > 1:
        c_re, c_im = lru_scan(h_re[..., -1], h_im[..., -1], nu * chunk, theta * chunk, chunk)  # state after chunk
        c_re, c_im = F.pad(c_re[..., :-1, None], (0, 0, 1, 0)), F.pad(c_im[..., :-1, None], (0, 0, 1, 0))
        pw = lambda_powers(nu, theta, chunk + 1)[1:]  # lambda^(i+1): [C, 2, H]
        q_re, q_im = (pw[:, k].T[:, None, None, :] for k in (0, 1))  # [H, 1, 1, C]
        h_re = h_re + (q_re * c_re - q_im * c_im)  # + lambda^(i+1) * carry
        h_im = h_im + (q_re * c_im + q_im * c_re)
    return h_re.reshape(hid, m, n * chunk)[..., pad:], h_im.reshape(hid, m, n * chunk)[..., pad:]


Rotation = tuple[np.ndarray, np.ndarray]  # lambda as recur_packed multiplies by it (rotation())


def _packable(state: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether ``steps`` may pack: CPU, no gradient, and each row's events before its padding."""
    if state.device.type != "cpu" or (torch.is_grad_enabled() and state.requires_grad) or mask.shape[1] == 0:
        return False
    return mask.shape[1] == 1 or bool((mask[:, 1:] <= mask[:, :-1]).all())


def rotation(lam: torch.Tensor) -> Rotation:
    """lambda [2, H] as the two arrays that multiply h [.., 2, H] and h with (re, im) swapped in
    :func:`recur_packed`: lambda h = h * [re, re] + h[::-1] * [-im, im]."""
    lr, li = lam.numpy()
    return np.stack([lr, lr]), np.stack([-li, li])


def recur_packed(h0: torch.Tensor, u: torch.Tensor, start: torch.Tensor, count: torch.Tensor,
                 rot: Rotation) -> tuple[torch.Tensor, torch.Tensor]:
    """h = lambda h + u over each user's own events, in numpy (a tenth of torch's cost per call on these small
    arrays; the same IEEE float32 products and sums, so the same bits). h0 [B, 2, H]; u [R, 2, H] holds user b's
    events at rows start[b] .. start[b] + count[b] - 1. Returns (h after each event [R, 2, H], zero elsewhere;
    each user's h after its last event [B, 2, H], h0 for a user without events). Users are taken longest first,
    so step t touches only the users with more than t events. ``rot`` is :func:`rotation` of lambda."""
    count_np = count.numpy()
    order = np.argsort(-count_np, kind="stable")
    counts, starts = count_np[order], start.numpy()[order]
    diag, cross = rot
    un = u.numpy()
    out = np.zeros_like(un)
    hs = h0.numpy()[order]  # a copy, in the users' new order
    longest = int(counts[0]) if len(counts) else 0
    active = (counts[None, :] > np.arange(longest)[:, None]).sum(1)  # users with more than t events
    for t in range(longest):
        n = active[t]
        at = starts[:n] + t
        h = hs[:n] * diag + hs[:n, ::-1] * cross + un[at]
        hs[:n] = h
        out[at] = h
    last = np.empty_like(hs)
    last[order] = hs
    return torch.from_numpy(out), torch.from_numpy(last)


# ----- layers --------------------------------------------------------------------------------------------------
class LRULayer(nn.Module):
    """One linear recurrent unit with complex projections, residual and LayerNorm."""

    def __init__(self, d_model: int, dropout: float, r_min: float = 0.8, r_max: float = 0.99) -> None:
        super().__init__()
        hid = 2 * d_model
        self.hid = hid
        u1, u2 = torch.rand(hid), torch.rand(hid)
        nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        theta_log = torch.log(2 * math.pi * u2)
        gamma_log = torch.log(torch.sqrt(1 - torch.exp(-torch.exp(nu_log)) ** 2))  # sqrt(1 - |lambda|^2)
        self.params_log = nn.Parameter(torch.stack([nu_log, theta_log, gamma_log]))  # [3, H]
        # B (in) and C (out) are complex; stored as real/imag parts. Only Re(C h + c) is used, so c is real.
        self.in_weight = nn.Parameter(torch.empty(2, hid, d_model))  # [re|im, H, d]
        self.in_bias = nn.Parameter(torch.empty(2, hid))
        self.out_weight = nn.Parameter(torch.empty(2, d_model, hid))  # [re|im, d, H]
        self.out_bias = nn.Parameter(torch.empty(d_model))
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model)
        self._serving_parts: tuple[tuple[int, ...], Rotation, torch.Tensor, torch.Tensor] | None = None

    def lambda_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nu_log, theta_log, gamma_log = self.params_log
        return torch.exp(nu_log), torch.exp(theta_log), torch.exp(gamma_log)

    def drive(self, x: torch.Tensor, mask: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """u = gamma * (B x + b), zero at padding.   x [..., d] -> u [..., 2, H]."""
        u = F.linear(x, self.in_weight.reshape(2 * self.hid, -1), self.in_bias.reshape(-1))
        u = u.unflatten(-1, (2, self.hid)) * gamma
        return u * mask[..., None, None].to(u.dtype)

    def readout(self, h: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """LayerNorm(Dropout(Re(C h + c)) + x) with Re(C h) = C_re h_re - C_im h_im.   h [..., 2, H]; ``w`` is
        :meth:`out_matrix` when the caller has it."""
        y = F.linear(h.flatten(-2), self.out_matrix() if w is None else w, self.out_bias)
        return self.layer_norm(self.dropout(y) + x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, d] -> (y [B, L, d], h at the last position [B, 2, H]). The maths of drive/readout, laid
        out channel-major inside so the scan works on contiguous memory."""
        nu, theta, gamma = self.lambda_parts()
        bsz, length, d = x.shape
        xt = x.reshape(bsz * length, d).T  # [d, BL] view
        keep = mask.reshape(1, bsz * length).to(x.dtype)
        w = self.in_weight * gamma[None, :, None]  # gamma folded into B and b
        b = self.in_bias * gamma[None]
        u_re = torch.addmm(b[0, :, None], w[0], xt) * keep  # [H, BL]
        u_im = torch.addmm(b[1, :, None], w[1], xt) * keep
        h_re, h_im = lru_scan(u_re.view(-1, bsz, length), u_im.view(-1, bsz, length), nu, theta)
        h_re, h_im = h_re.reshape(self.hid, -1), h_im.reshape(self.hid, -1)
        y = torch.addmm(self.out_bias, h_re.T, self.out_weight[0].T) - h_im.T @ self.out_weight[1].T  # Re(C h + c)
        y = self.layer_norm(self.dropout(y.view(bsz, length, d)) + x)
        last = torch.stack([h_re.view(-1, bsz, length)[..., -1].T, h_im.view(-1, bsz, length)[..., -1].T], dim=1)
        return y, last

    def out_matrix(self) -> torch.Tensor:
        """[C_re | -C_im] [d, 2H]: Re(C h) as one real product with the (re, im) parts of h side by side."""
        return torch.cat([self.out_weight[0], -self.out_weight[1]], dim=1)

    def step_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda [2, H], gamma [H]): what one step of the recurrence multiplies by."""
        nu, theta, gamma = self.lambda_parts()
        return lambda_powers(nu, theta, 2)[1], gamma

    def serving_parts(self) -> tuple[Rotation, torch.Tensor, torch.Tensor]:
        """(:func:`rotation` of lambda, gamma, :meth:`out_matrix`) for steps without gradient (CPU), kept until the
        weights change (their tensors or in-place version counters): a worker's batches would otherwise
        recompute these ten small operations per layer per batch from the same weights. The same operations on
        the same numbers: the same bits."""
        weights = (self.params_log, self.out_weight)
        key = tuple(n for p in weights for n in (id(p), p.data_ptr(), p._version))
        if self._serving_parts is None or self._serving_parts[0] != key:
            lam, gamma = self.step_parts()
            self._serving_parts = (key, rotation(lam), gamma, self.out_matrix())
        return self._serving_parts[1:]

    def steps(self, h: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k events per row: h [B, 2, H], x [B, k, d], mask [B, k] -> (y [B, k, d], h after them). Padding
        positions keep the state. The projections run once over all k positions; only the elementwise
        recurrence h = lambda * h + u loops."""
        lam, gamma = self.step_parts()
        u = self.drive(x, mask, gamma)  # [B, k, 2, H]
        hs = []
        for t in range(x.shape[1]):
            h = torch.where(mask[:, t, None, None], complex_mul(lam, h) + u[:, t], h)
            hs.append(h)
        return self.readout(torch.stack(hs, dim=1), x), h


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.dropout(self.w_2(self.dropout(F.gelu(self.w_1(x))))) + x)


class LRUBlock(nn.Module):
    def __init__(self, d_model: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.lru_layer = LRULayer(d_model, attn_dropout)
        self.feed_forward = FeedForward(d_model, 4 * d_model, dropout)


# ----- the model -----------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LRURecConfig(SeqRecConfig):
    """LRURec's hyper-parameters (the official code's names in brackets)."""

    name: ClassVar[str] = "lrurec"

    attn_dropout: float = 0.2
    """Dropout on each LRU layer's output before its residual [bert_attn_dropout: the LRU layer takes the place
    of the attention it is named after]."""


class LRURec(SeqRecModel):
    """State: one tensor [B, num_layers, 2, H] holding every layer's complex h as (re, im)."""

    config: LRURecConfig

    def __init__(self, config: LRURecConfig, num_items: int) -> None:
        super().__init__(config, num_items)
        d_model, dropout = config.d_model, config.dropout
        self.num_layers = config.num_layers
        self.token = nn.Embedding(num_items + 2, d_model)  # 0 pad, 1..N items, N+1 OOV
        self.embed_dropout = nn.Dropout(dropout)
        self.embed_layer_norm = nn.LayerNorm(d_model)
        self.blocks = nn.ModuleList([LRUBlock(d_model, dropout, config.attn_dropout) for _ in range(self.num_layers)])
        self.item_bias = nn.Parameter(torch.zeros(num_items + 2))
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if "layer_norm" not in name and "params_log" not in name:
                truncated_normal_(p.data)

    def item_table(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.token.weight, self.item_bias

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        return self.embed_layer_norm(self.embed_dropout(self.token(items)))

    def _run(self, items: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (hidden [B, L, d], per layer the state after the last position [B, 2, H])."""
        mask = items > 0
        x = self.embed(items)
        states = []
        for block in self.blocks:
            x, last = block.lru_layer(x, mask)
            x = block.feed_forward(x)
            states.append(last)
        return x, states

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self._run(items)[0]

    def init_state(self, batch_size: int) -> torch.Tensor:
        p = self.token.weight
        return torch.zeros(batch_size, self.num_layers, 2, 2 * self.d_model, dtype=p.dtype, device=p.device)

    def step(self, state: torch.Tensor, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state, h = self.steps(state, item[:, None])  # one event: the k = 1 case of the same maths
        return state, h[:, 0]

    def steps(self, state: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = items > 0
        if _packable(state, mask):
            return self._packed_steps(state, items, mask)
        x = self.embed(items)
        new_states = []
        for i, block in enumerate(self.blocks):
            x, h = block.lru_layer.steps(state[:, i], x, mask)
            x = block.feed_forward(x)
            new_states.append(h)
        return torch.stack(new_states, dim=1), x

    def _packed_steps(self, state: torch.Tensor, items: torch.Tensor, mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``steps`` for the worker's batches (each row's events first, then padding; CPU, no gradient): every
        projection runs over the batch's events only, packed user by user (padded to MIN_ROWS rows, so that a
        product's rows never take the few-row kernels), and the recurrence over each user's own events
        (:func:`recur_packed`). The same operations on the same numbers as ``steps`` does on the real positions."""
        count = mask.sum(1)
        events = int(count.sum())
        rows = max(events, MIN_ROWS)
        real = torch.arange(rows) < events
        x = self.embed(F.pad(items[mask], (0, rows - events)))  # [rows, d]
        start = torch.cumsum(count, 0) - count  # each user's first row
        new_states = []
        for i, block in enumerate(self.blocks):
            layer = block.lru_layer
            rot, gamma, w_out = layer.serving_parts()
            hs, last = recur_packed(state[:, i], layer.drive(x, real, gamma), start, count, rot)
            x = block.feed_forward(layer.readout(hs, x, w_out))
            new_states.append(last)
        hidden = x.new_zeros(*items.shape, x.shape[-1])
        hidden[mask] = x[:events]
        return torch.stack(new_states, dim=1), hidden

    def prefill(self, items: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._run(items)[1], dim=1)

    def state_rows(self, state: torch.Tensor) -> torch.Tensor:
        return state.reshape(state.shape[0], -1)

    def state_from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.reshape(rows.shape[0], self.num_layers, 2, 2 * self.d_model)

    def grow_items(self, new_num_items: int) -> None:
        if new_num_items <= self.num_items:
            return
        old = self.num_items
        with torch.no_grad():
            weight = grow_embedding(self.token.weight.data, old, new_num_items)
            bias = grow_embedding(self.item_bias.data[:, None], old, new_num_items)[:, 0]
        self.token = nn.Embedding.from_pretrained(weight, freeze=False)
        self.item_bias = nn.Parameter(bias)
        self.num_items = new_num_items
