"""Models: one contract suite over the model registry, then the registry and configs, then model-specific tests.

The contract (River style: every registered model, and each of its boolean switches flipped, e.g. LinRec's
``causal``): incremental ``step`` equals the parallel forward; left padding is invisible; states round-trip as
bytes; scores have the documented shapes and never recommend padding; a version saved to the model store loads
back exactly; the batched ``steps`` of served models are bit-for-bit independent of how a stream is cut.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from dataclasses import fields, replace
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from lrustream.kernel.config import ConfigError, ModelConfig, load_config
from models import (
    MODEL_NAMES,
    LinRecConfig,
    LRURecConfig,
    SeqRecConfig,
    SeqRecModel,
    build_model,
    config_class,
    config_from_dict,
    model_config,
)
from models.base import padded_steps
from models.linrec import elu_norm
from models.lrurec import lru_scan
from models.store import ModelStore
from models.vocab import Vocabulary
from tests.conftest import REPO

NUM_ITEMS = 60
LENGTHS = [1, 2, 3, 7, 15, 16, 17, 33, 64, 100, 129, 200, 255, 300]


def _variants() -> list[SeqRecConfig]:
    """Every registered model at its defaults (d_model 32), then with each boolean field flipped."""
    out = []
    for name in MODEL_NAMES:
        base = config_class(name)(d_model=32, max_len=320)
        out.append(base)
        out += [replace(base, **{f.name: not getattr(base, f.name)}) for f in fields(base)
                if isinstance(getattr(base, f.name), bool)]
    return out


def _id(config: SeqRecConfig) -> str:
    flipped = [f"{f.name}={getattr(config, f.name)}" for f in fields(config)
               if isinstance(getattr(config, f.name), bool) and getattr(config, f.name) != f.default]
    return "-".join([config.name, *flipped])


def _kind(config: SeqRecConfig) -> SeqRecModel:
    return build_model(replace(config, d_model=8, max_len=4), 2)


VARIANTS = _variants()
IDS = [_id(c) for c in VARIANTS]
ALL_POSITIONS = [c for c in VARIANTS if _kind(c).loss_positions == "all"]  # causal: what the stream serves
WINDOWS = [c for c in VARIANTS if _kind(c).state_is_ids]  # served by recomputing a window of item ids
each_variant = pytest.mark.parametrize("config", VARIANTS, ids=IDS)
each_served = pytest.mark.parametrize("config", ALL_POSITIONS, ids=[_id(c) for c in ALL_POSITIONS])
each_name = pytest.mark.parametrize("name", MODEL_NAMES)


def make(config: SeqRecConfig, dtype: torch.dtype, seed: int = 0, **changes: object) -> SeqRecModel:
    torch.manual_seed(seed)
    return build_model(replace(config, **changes), NUM_ITEMS).to(dtype).eval()


def left_padded(lengths: list[int], total: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, NUM_ITEMS + 1, (len(lengths), total), generator=g)
    for row, n in enumerate(lengths):
        items[row, : total - n] = 0
    return items


def reference_hidden(model: SeqRecModel, items: torch.Tensor) -> torch.Tensor:
    """What the hidden state at each position MEANS: the parallel forward (a prefix for window models)."""
    if model.loss_positions == "all":
        return model(items)
    out = torch.zeros(*items.shape, model.d_model, dtype=model.item_table()[0].dtype)
    for t in range(items.shape[1]):
        out[:, t] = model(items[:, : t + 1])[:, -1]
    return out


# ----- the contract every registered model keeps ---------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@each_variant
def test_step_matches_parallel_forward_at_every_position(config: SeqRecConfig, dtype: torch.dtype,
                                                         tol: float) -> None:
    model = make(config, dtype)
    lengths_to_check = LENGTHS if model.loss_positions == "all" else [1, 2, 17, 64]
    with torch.no_grad():
        for total in lengths_to_check:
            lengths = sorted({total, max(1, total // 2), 1}, reverse=True)
            items = left_padded(lengths, total, seed=total)
            ref = reference_hidden(model, items)
            state = model.init_state(len(lengths))
            for t in range(total):
                state, h = model.step(state, items[:, t])
                real = items[:, t] > 0
                err = (h[real] - ref[real, t]).abs().max().item() if real.any() else 0.0
                assert err <= tol, f"{model.name} L={total} t={t}: |step - forward| = {err:.2e}"
            # prefill (parallel) reaches the same state as stepping one event at a time
            prefilled = model.state_rows(model.prefill(items)).double()
            assert (prefilled - model.state_rows(state).double()).abs().max().item() <= tol


@each_variant
def test_left_padding_is_invisible(config: SeqRecConfig) -> None:
    model = make(config, torch.float64)
    items = left_padded([20], 20)
    padded = torch.nn.functional.pad(items, (37, 0))
    with torch.no_grad():
        assert torch.allclose(model(items)[:, -1], model(padded)[:, -1], atol=1e-10, rtol=0)


@each_variant
def test_state_bytes_round_trip_and_size(config: SeqRecConfig) -> None:
    model = make(config, torch.float32)
    with torch.no_grad():
        state = model.prefill(left_padded([30, 5, 1], 30))
        blobs = model.state_to_bytes(state, "float32")
        assert len(blobs) == 3 and all(len(b) == model.state_nbytes("float32") for b in blobs)
        back = model.state_from_bytes(blobs, "float32")
        assert torch.equal(model.state_rows(back), model.state_rows(state))
        half = model.state_from_bytes(model.state_to_bytes(state, "float16"), "float16")
        assert torch.allclose(model.state_rows(half).float(), model.state_rows(state).float(), atol=2e-3, rtol=1e-2)
    with pytest.raises(ValueError, match="does not fit"):
        model.state_from_bytes([b"\x00" * 7], "float32")


@each_variant
def test_shapes_and_scores_never_recommend_padding_or_the_oov_row(config: SeqRecConfig) -> None:
    model = make(config, torch.float32)
    d = model.d_model
    with torch.no_grad():
        state, h = model.step(model.init_state(2), torch.tensor([3, model.oov_index]))
        logits = model.score(h)
        _, hs = model.steps(state, torch.tensor([[4, 5, 0], [6, 0, 0]]))
        forward = model(left_padded([9, 4], 9))
        assert (h.shape, hs.shape, forward.shape) == ((2, d), (2, 3, d), (2, 9, d))
        assert model.score(forward).shape == (2, 9, NUM_ITEMS + 1)
        assert model.state_rows(state).shape == (2, model.state_size())
    assert logits.shape == (2, NUM_ITEMS + 1)
    assert torch.isneginf(logits[:, 0]).all() and torch.isfinite(logits[:, 1:]).all()


@each_variant
def test_checkpoint_round_trips_through_the_model_store(config: SeqRecConfig, tmp_path: Path) -> None:
    model = make(config, torch.float32, max_len=50)
    store = ModelStore(tmp_path)
    info = store.publish(model, Vocabulary.identity(NUM_ITEMS), metrics={"NDCG@10": 0.1})
    loaded = store.load()
    assert loaded.info.version == info.version == store.current()
    assert (loaded.info.model, loaded.info.num_items, loaded.info.metrics) == (model.name, NUM_ITEMS, {"NDCG@10": 0.1})
    assert loaded.model.config == model.config and loaded.info.config == model.config.as_dict()
    items = left_padded([20, 3], 20)
    with torch.no_grad():
        assert torch.equal(loaded.model(items), model(items))
        assert torch.equal(loaded.model.state_rows(loaded.model.prefill(items)), model.state_rows(model.prefill(items)))
    assert type(loaded.model) is type(model)


@each_served
def test_step_is_batch_invariant_bit_for_bit_from_min_rows(config: SeqRecConfig) -> None:
    """The stream pads every batched step to >= 16 rows; a user's new state must then not depend on who else
    is in the batch (BLAS picks other kernels for tiny M, so fewer rows may differ in the last bit)."""
    model = make(config, torch.float32)
    g = torch.Generator().manual_seed(3)
    rows = model.state_rows(model.prefill(left_padded([30] * 64, 30)))
    items = torch.randint(1, NUM_ITEMS + 1, (64,), generator=g)
    with torch.no_grad():
        full, _ = model.step(model.state_from_rows(rows), items)
        for n in (16, 17, 40):
            pick = torch.randperm(64, generator=g)[:n]
            part, _ = model.step(model.state_from_rows(rows[pick]), items[pick])
            assert torch.equal(model.state_rows(part), model.state_rows(full)[pick])


@each_served
def test_steps_over_chunks_equal_single_steps_bit_for_bit(config: SeqRecConfig) -> None:
    """The worker advances k events per user in one ``steps`` call; however a stream is cut into micro-batches
    (after a crash it is cut differently) the states must be identical, so chunked == one-by-one exactly."""
    model = make(config, torch.float32)
    g = torch.Generator().manual_seed(3)
    users, total = 20, 23
    items = torch.randint(1, 50, (users, total), generator=g)
    with torch.no_grad():
        one = model.init_state(users)
        for t in range(total):
            one, _ = model.step(one, items[:, t])
        for cuts in ([23], [1, 22], [5, 7, 11], [9, 14]):
            state, start = model.init_state(users), 0
            for k in cuts:
                ragged = items[:, start: start + k].clone()
                ragged[::3, k // 2:] = 0  # some users have fewer events in this chunk: right padding
                state, _ = padded_steps(model, state, ragged)
                rest = items[::3, start + k // 2: start + k]
                if rest.shape[1]:  # ... and get them in a second call, with only those users
                    rows = model.state_rows(state)
                    sub, _ = padded_steps(model, model.state_from_rows(rows[::3]), rest)
                    state = _put_rows(model, state, sub, slice(None, None, 3))
                start += k
            assert torch.equal(model.state_rows(state), model.state_rows(one)), f"{model.name} cuts {cuts}"


def _put_rows(model: SeqRecModel, state: object, sub: object, rows: slice) -> object:
    full = model.state_rows(state).clone()
    full[rows] = model.state_rows(sub)
    return model.state_from_rows(full)


# ----- the registry and the per-model configs ------------------------------------------------------------------
@each_variant
def test_a_model_is_what_its_config_says(config: SeqRecConfig) -> None:
    model = build_model(config, NUM_ITEMS)
    assert model.config is config and model.name == config.name and config.name in MODEL_NAMES
    assert model.hparams() == {"num_items": NUM_ITEMS, **config.as_dict()}
    assert config_from_dict(config.name, config.as_dict()) == config
    assert (model.d_model, model.max_len) == (config.d_model, config.max_len)


def _documented(cls: type) -> set[str]:
    """Fields followed by a docstring in the class bodies of ``cls`` and its config bases."""
    names = set()
    for klass in cls.__mro__:
        if not issubclass(klass, SeqRecConfig):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, after in pairwise(body):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                names.add(stmt.target.id)
    return names


@each_name
def test_every_config_field_has_a_docstring(name: str) -> None:
    cls = config_class(name)
    assert {f.name for f in fields(cls)} <= _documented(cls)
    assert "name" in _documented(cls)


@each_name
def test_the_config_file_section_gives_each_model_the_fields_it_declares(name: str) -> None:
    """Every key of ``model:`` set away from its default: each field comes from its key (``file_keys``: LinRec's
    ``causal`` from ``linrec_causal``), and the keys a model does not declare are left to the others."""
    cfg = load_config(overrides=["model.d_model=24", "model.num_layers=3", "model.num_heads=4", "model.dropout=0.1",
                                 "model.attn_dropout=0.3", "model.max_len=77", "model.linrec_causal=false",
                                 f"model.name={name}"])
    config = model_config(cfg.model)
    assert type(config) is config_class(name)
    for f in fields(config):
        assert getattr(config, f.name) == getattr(cfg.model, config.file_keys.get(f.name, f.name)), f.name
    assert config == model_config(cfg.model, name)


def test_defaults_of_the_config_file_and_of_the_configs_agree() -> None:
    """The config file's ``model:`` defaults build the same models as the configs' own defaults."""
    for name in MODEL_NAMES:
        assert model_config(load_config().model, name) == config_class(name)()
    assert LinRecConfig.file_keys == {"causal": "linrec_causal"}


def test_unknown_names_and_fields_are_refused_in_one_line() -> None:
    cfg = load_config(overrides=["model.name=gru4rec"])  # the kernel's schema lists no models
    with pytest.raises(ConfigError) as refused:
        model_config(cfg.model)
    assert str(refused.value) == f"model.name must be one of {', '.join(MODEL_NAMES)} (got 'gru4rec')"
    with pytest.raises(ValueError, match=re.escape(f"unknown model 'gru4rec'; choose one of {', '.join(MODEL_NAMES)}")):
        config_from_dict("gru4rec", {})
    with pytest.raises(ValueError, match=re.escape("unknown hyper-parameters for lrurec: ['causal']")):
        config_from_dict("lrurec", {"causal": True})
    with pytest.raises(TypeError, match="not a registered model config"):
        build_model(SeqRecConfig(), NUM_ITEMS)
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        build_model(model_config(ModelConfig(d_model=30, num_heads=4), "sasrec"), NUM_ITEMS)


def test_the_registry_is_the_only_list_of_model_names() -> None:
    """No module of the packages names two models: lists of models come from ``MODEL_NAMES``."""
    quoted = re.compile("[\"'](" + "|".join(map(re.escape, MODEL_NAMES)) + ")[\"']")
    offenders = {}
    for pkg in ("lrustream", "models", "state", "stream", "trainer"):
        for path in (REPO / pkg).rglob("*.py"):
            found = set(quoted.findall(path.read_text()))
            if len(found) > 1:
                offenders[str(path.relative_to(REPO))] = sorted(found)
    assert offenders == {}


# ----- model-specific ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", WINDOWS, ids=[_id(c) for c in WINDOWS])
def test_window_models_step_over_the_last_max_len_items(config: SeqRecConfig) -> None:
    model = make(config, torch.float64, max_len=16)
    items = left_padded([40], 40)
    with torch.no_grad():
        state = model.init_state(1)
        for t in range(40):
            state, h = model.step(state, items[:, t])
            window = items[:, max(0, t - 15): t + 1]
            assert torch.allclose(h, model(window)[:, -1], atol=1e-10, rtol=0)
        assert state.tolist() == [items[0, -16:].tolist()]


def test_linrec_normalisation_leaves_an_all_zero_row_zero_with_an_ordinary_gradient() -> None:
    """Dropout can zero a whole token of a narrow model (d_model 8: 1 in 60 at 0.6), and with zero biases its
    query is then exactly zero; a norm clamped at 1e-12 multiplied that row's gradient by 1e12."""
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.3, -0.2, 0.1, 0.5]], requires_grad=True)
    weights = torch.tensor([1.0, -2.0, 3.0, 0.5])
    out = elu_norm(x)
    (out * weights).sum().backward()
    e = torch.nn.functional.elu(x[1].detach())
    assert out[0].tolist() == [0.0] * 4 and torch.equal(out[1], e / e.norm())  # the official formula, exactly
    assert torch.equal(x.grad[0], weights)  # ELU'(0) = 1, divided by 1 instead of 1e-12


def test_lru_scan_gradients_are_exact_and_reach_every_parameter() -> None:
    torch.manual_seed(0)
    u_re, u_im = (torch.randn(4, 2, 37, dtype=torch.float64, requires_grad=True) for _ in range(2))
    nu = torch.rand(4, dtype=torch.float64).mul(0.2).add(0.01).requires_grad_()
    theta = torch.rand(4, dtype=torch.float64).mul(6.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c, d: lru_scan(a, b, c, d, chunk=8), (u_re, u_im, nu, theta))
    model = make(LRURecConfig(d_model=32, max_len=320), torch.float32)
    model.train()
    loss = torch.nn.functional.cross_entropy(model.score(model(left_padded([50, 10], 50))).flatten(0, 1)[:, 1:],
                                             torch.randint(0, NUM_ITEMS, (100,)))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        if "token" not in pname and "item_bias" not in pname:
            assert p.grad.abs().sum() > 0, f"no gradient reaches {pname}"
