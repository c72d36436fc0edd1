"""The one interface every model implements, so trainer, evaluator and stream treat models alike.

    h = m(items)                       # items [B, L] left-padded with 0  -> hidden [B, L, d]   (training, parallel)
    state = m.init_state(B)            # recurrent state of B users
    state, h_t = m.step(state, item)   # item [B]: one event per user    -> new state, hidden [B, d]   (serving)
    state, h = m.steps(state, items)   # items [B, k] right-padded: k events per user in one call   (serving)
    logits = m.score(h_t)              # [B, N + 1]; column 0 (padding) is -inf, never recommended
    state = m.prefill(items)           # state after reading a left-padded window (parallel; model swaps)

Item ids: 0 is padding, 1..N are catalogue items, N + 1 is the out-of-vocabulary (OOV) item the stream may
feed for an item the model has never seen. The OOV row has an embedding (so the state still advances) but is
never scored. States cross process boundaries as rows of numbers: ``state_rows``/``state_from_rows``, and
bytes per user via ``state_to_bytes``/``state_from_bytes`` (what the state store keeps).

Hyper-parameters: every model is built from a frozen config dataclass declared beside it (``LRURecConfig`` in
models/lrurec.py, ...), a subclass of :class:`SeqRecConfig` holding exactly the fields that model reads, and
the number of items, which is not a hyper-parameter (it grows with the vocabulary). ``model.config`` is that
config; ``model.name`` its ``name``. models/registry.py maps names to configs and models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from lrustream.kernel.config import ModelConfig

State = Any  # a tensor or a small tuple of tensors; each model documents its own


def truncated_normal_(t: torch.Tensor, std: float = 0.02, bound: float = 0.04) -> torch.Tensor:
    """N(0, std) cut at +-bound by inverse-CDF sampling (as the LRURec code does, so inits match)."""
    lo = (1.0 + math.erf(-bound / std / math.sqrt(2.0))) / 2.0
    hi = (1.0 + math.erf(bound / std / math.sqrt(2.0))) / 2.0
    with torch.no_grad():
        t.uniform_(2 * lo - 1, 2 * hi - 1).erfinv_().mul_(std * math.sqrt(2.0))
    return t


@dataclass(frozen=True, kw_only=True)
class SeqRecConfig:
    """The hyper-parameters every model reads; each model's config subclasses it with its own fields."""

    name: ClassVar[str] = ""
    """The model this config builds: its name in the registry, the config file's ``model.name``."""
    file_keys: ClassVar[Mapping[str, str]] = {}
    """Fields whose key in the config file's ``model:`` section differs from the field's name."""
    retired: ClassVar[frozenset[str]] = frozenset()
    """Keys that older model stores recorded for this model although it never read them: ignored on reading."""

    d_model: int = 64
    """Width of the item embeddings and of every hidden state."""
    num_layers: int = 2
    """Blocks stacked on the item embedding, each a sequence mixer then a feed-forward layer."""
    dropout: float = 0.2
    """Dropout on the embeddings and on the blocks' outputs while training (serving runs in eval mode)."""
    max_len: int = 200
    """Most recent items of a history the model is trained on (and, for window models, serves from)."""

    @classmethod
    def from_section(cls, section: ModelConfig) -> SeqRecConfig:
        """This config from the config file's ``model:`` section (``lrustream.kernel.config.ModelConfig``): every
        declared field from its key there; the section's other keys are other models' business."""
        return cls(**{f.name: getattr(section, cls.file_keys.get(f.name, f.name)) for f in fields(cls)})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SeqRecConfig:
        """This config from ``as_dict``'s output; a key it does not declare (nor retired) raises ValueError (no
        silent typos), a key it lacks takes the field's default."""
        declared = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - declared - cls.retired)
        if unknown:
            raise ValueError(f"unknown hyper-parameters for {cls.name}: {unknown}")
        return cls(**{k: v for k, v in values.items() if k in declared})

    def as_dict(self) -> dict[str, Any]:
        """The fields (JSON-ready); ``name`` is the class's, not a field."""
        return asdict(self)


class SeqRecModel(nn.Module):
    """Base class: shared scoring, state (de)serialisation and bookkeeping."""

    #: "loss at every position" (causal models) or "last position only" (models that see the whole window)
    loss_positions: str = "all"
    #: dtype of the state rows: floating for recurrences, int64 for id windows
    state_is_ids: bool = False

    def __init__(self, config: SeqRecConfig, num_items: int) -> None:
        super().__init__()
        self.config = config
        self.num_items = num_items
        self.d_model = config.d_model
        self.max_len = config.max_len

    @property
    def name(self) -> str:
        return self.config.name

    # ----- what subclasses implement -----------------------------------------------------------------------
    def forward(self, items: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, d]
        raise NotImplementedError

    def init_state(self, batch_size: int) -> State:
        raise NotImplementedError

    def step(self, state: State, item: torch.Tensor) -> tuple[State, torch.Tensor]:
        raise NotImplementedError

    def prefill(self, items: torch.Tensor) -> State:
        raise NotImplementedError

    def steps(self, state: State, items: torch.Tensor) -> tuple[State, torch.Tensor]:
        """Several events per user: items [B, k] right-padded with 0 -> (state after them, hidden [B, k, d]).
        Exactly ``step`` applied column by column (padding leaves a state unchanged); models override it to
        batch the work that does not depend on the previous step."""
        hidden = []
        for j in range(items.shape[1]):
            state, h = self.step(state, items[:, j])
            hidden.append(h)
        return state, torch.stack(hidden, dim=1)

    def state_rows(self, state: State) -> torch.Tensor:  # -> [B, S]
        raise NotImplementedError

    def state_from_rows(self, rows: torch.Tensor) -> State:
        raise NotImplementedError

    def item_table(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embedding rows 0..N+1, optional per-item bias) used for tied-embedding scoring."""
        raise NotImplementedError

    # ----- shared ------------------------------------------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        """The config's fields and the current number of items: what a training checkpoint must agree with."""
        return {"num_items": self.num_items, **self.config.as_dict()}

    @property
    def oov_index(self) -> int:
        return self.num_items + 1

    def score(self, h: torch.Tensor) -> torch.Tensor:
        """Tied-embedding scores over item ids 0..N: [.., d] -> [.., N + 1]; padding column is -inf."""
        emb, bias = self.item_table()
        if bias is not None and h.dim() == 2:
            logits = torch.addmm(bias[: self.num_items + 1], h, emb[: self.num_items + 1].T)  # one pass, not two
        else:
            logits = h @ emb[: self.num_items + 1].T
            if bias is not None:
                logits = logits + bias[: self.num_items + 1]
        logits[..., 0] = float("-inf")
        return logits

    def state_size(self) -> int:
        """Numbers per user in a state row."""
        return int(self.state_rows(self.init_state(1)).shape[1])

    def state_nbytes(self, dtype: str = "float32") -> int:
        return self.state_size() * self._np_dtype(dtype).itemsize

    def _np_dtype(self, dtype: str) -> np.dtype:
        return np.dtype(np.int32) if self.state_is_ids else np.dtype(dtype)

    def state_to_bytes(self, state: State, dtype: str = "float32") -> list[bytes]:
        """One bytes object per user (float32/float16 for recurrent states, int32 for id windows)."""
        rows = self.state_rows(state).detach().cpu().numpy().astype(self._np_dtype(dtype), copy=False)
        return [row.tobytes() for row in rows]

    def state_from_bytes(self, blobs: list[bytes], dtype: str = "float32") -> State:
        np_dtype = self._np_dtype(dtype)
        size = self.state_size()
        for blob in blobs:
            if len(blob) != size * np_dtype.itemsize:
                raise ValueError(f"state of {len(blob)} bytes does not fit {self.name} ({size} x {np_dtype})")
        arr = np.frombuffer(b"".join(blobs), dtype=np_dtype).reshape(len(blobs), size)
        ref = self._reference_param()
        rows = torch.from_numpy(arr.copy())
        rows = rows.long() if self.state_is_ids else rows.to(ref.dtype)
        return self.state_from_rows(rows.to(ref.device))

    def _reference_param(self) -> torch.Tensor:
        return next(self.parameters())

    def last_hidden(self, items: torch.Tensor) -> torch.Tensor:
        """Hidden state at the last position of each left-padded row: what evaluation scores."""
        return self(items)[:, -1]

    def grow_items(self, new_num_items: int) -> None:
        """Append rows for items new to the vocabulary (ids N+1.. shift the OOV row to the end)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_items={self.num_items}, d_model={self.d_model}, max_len={self.max_len}"


MIN_ROWS = 16


def padded_steps(model: SeqRecModel, state: State, items: torch.Tensor, min_rows: int = MIN_ROWS
                 ) -> tuple[State, torch.Tensor]:
    """``model.steps`` with the batch padded to at least ``min_rows`` users. Small matrix products take other
    kernels than large ones, so a user's numbers would depend on how many users share the call; from about a
    dozen rows on, each row's result is the same whatever the batch (checked by the tests), which makes a
    user's state independent of how the stream was cut into micro-batches."""
    n = items.shape[0]
    if n < min_rows:
        rows = model.state_rows(state)
        pad = model.state_rows(model.init_state(min_rows - n)).to(device=rows.device, dtype=rows.dtype)
        state = model.state_from_rows(torch.cat([rows, pad]))
        items = torch.cat([items, items.new_zeros(min_rows - n, items.shape[1])])
    state, hidden = model.steps(state, items)
    return model.state_from_rows(model.state_rows(state)[:n]), hidden[:n]


def grow_embedding(weight: torch.Tensor, old_n: int, new_n: int, init: str = "oov") -> torch.Tensor:
    """New table of rows 0..new_n+1: old item rows kept, new items start at the OOV embedding, OOV row kept."""
    old_oov = weight[old_n + 1]
    new_rows = old_oov.expand(new_n - old_n, *weight.shape[1:]).clone()
    return torch.cat([weight[: old_n + 1], new_rows, old_oov.unsqueeze(0)], dim=0)
