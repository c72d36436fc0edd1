"""The model registry: the only list of model names in the code base.

    from models import build_model, model_config
    config = model_config(cfg.model)                   # the config file's ``model:`` section -> LRURecConfig(...)
    model = build_model(config, num_items=3416)
    model = build_model(SASRecConfig(d_model=32), num_items=3416)

Contracts:

* A model is registered by its config class (models/base.py ``SeqRecConfig``; its ``name`` is the model's name)
  paired with the callable that builds the model from that config and a number of items. ``MODEL_NAMES`` lists
  the names in registration order; nothing else in the code base lists them.
* :func:`model_config` reads the config file's section (``lrustream.kernel.config.ModelConfig``, whose keys
  never change for users) into the named model's config, taking only the fields that model declares; an unknown
  ``model.name`` is a one-line :class:`ConfigError` naming the key and the choices. Every CLI command that
  builds or loads a model calls it before it starts anything (the kernel cannot: it imports no model).
* :func:`config_from_dict` rebuilds a config from its ``as_dict()`` (what the model store keeps); an unknown
  name or field raises ValueError. :func:`build_model` builds from a registered config, or raises TypeError.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lrustream.kernel.config import ConfigError, ModelConfig
from models.base import SeqRecConfig, SeqRecModel
from models.linrec import LinRec, LinRecConfig
from models.lrurec import LRURec, LRURecConfig
from models.sasrec import SASRec, SASRecConfig

Builder = Callable[[Any, int], SeqRecModel]

_BUILDERS: dict[type[SeqRecConfig], Builder] = {LRURecConfig: LRURec, LinRecConfig: LinRec, SASRecConfig: SASRec}
CONFIGS: dict[str, type[SeqRecConfig]] = {config.name: config for config in _BUILDERS}
"""Model name -> its config class."""
MODEL_NAMES: tuple[str, ...] = tuple(CONFIGS)


def config_class(name: str) -> type[SeqRecConfig]:
    """The config class of a registered model; ValueError naming the choices otherwise."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}") from None


def model_config(section: ModelConfig, name: str | None = None) -> SeqRecConfig:
    """The config file's ``model:`` section as the config of model ``name`` (default: ``section.name``)."""
    name = section.name if name is None else name
    if name not in CONFIGS:
        raise ConfigError(f"model.name must be one of {', '.join(MODEL_NAMES)} (got {name!r})")
    return CONFIGS[name].from_section(section)


def config_from_dict(name: str, values: Mapping[str, Any]) -> SeqRecConfig:
    """Model ``name``'s config from its ``as_dict()``; unknown names or fields raise ValueError."""
    return config_class(name).from_dict(values)


def build_model(config: SeqRecConfig, num_items: int) -> SeqRecModel:
    """A freshly initialised model (torch's global RNG draws its weights) scoring items 1..num_items."""
    builder = _BUILDERS.get(type(config))
    if builder is None:
        raise TypeError(f"{type(config).__name__} is not a registered model config")
    return builder(config, num_items)
