"""Sequential recommenders behind one interface (see models/base.py): LRURec, LinRec, SASRec.

    from models import LRURecConfig, build_model, model_config
    m = build_model(LRURecConfig(d_model=64), num_items=3416)
    m = build_model(model_config(cfg.model), num_items=3416)     # from the config file's ``model:`` section

Each model's hyper-parameters are a config dataclass beside it; models/registry.py is the one list of models.
Models know nothing of Kafka, state stores or training loops.
"""

from __future__ import annotations

from models.base import SeqRecConfig, SeqRecModel, State
from models.linrec import LinRecConfig
from models.lrurec import LRURecConfig
from models.registry import CONFIGS, MODEL_NAMES, build_model, config_class, config_from_dict, model_config
from models.sasrec import SASRecConfig

__all__ = ["CONFIGS", "MODEL_NAMES", "LRURecConfig", "LinRecConfig", "SASRecConfig", "SeqRecConfig",
           "SeqRecModel", "State", "build_model", "config_class", "config_from_dict", "model_config"]
