"""Sequential recommenders behind one interface (see models/base.py): LRURec, LinRec, SASRec.

    from models import build_model
    m = build_model("lrurec", num_items=3416, d_model=64)

Models know nothing of Kafka, state stores or training loops.
"""

from __future__ import annotations

from typing import Any

from models.base import SeqRecModel, State
from models.linrec import LinRec
from models.lrurec import LRURec
from models.sasrec import SASRec

MODELS = {"lrurec": LRURec, "linrec": LinRec, "sasrec": SASRec}
_PARAMS = {"d_model", "num_layers", "num_heads", "dropout", "attn_dropout", "max_len", "causal"}


def build_model(name: str, num_items: int, **hparams: Any) -> SeqRecModel:
    """Construct a model by name. Unknown names or hyper-parameters raise ValueError (no silent typos)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    unknown = set(hparams) - _PARAMS
    if unknown:
        raise ValueError(f"unknown hyper-parameters for {name}: {sorted(unknown)}")
    if "causal" in hparams and name != "linrec":
        hparams = {k: v for k, v in hparams.items() if k != "causal"}
    return MODELS[name](num_items=num_items, **hparams)


__all__ = ["MODELS", "SeqRecModel", "State", "build_model"]
