"""Models: incremental `step` equals the parallel forward; gradients flow; states and checkpoints round-trip."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from models.base import padded_steps
from models.lrurec import lru_scan
from models.store import ModelStore
from models.vocab import Vocabulary

NUM_ITEMS = 60
LENGTHS = [1, 2, 3, 7, 15, 16, 17, 33, 64, 100, 129, 200, 255, 300]
VARIANTS = [("lrurec", {}), ("linrec", {}), ("linrec", {"causal": False}), ("sasrec", {})]
IDS = ["lrurec", "linrec-causal", "linrec-unmasked", "sasrec"]


def make(name: str, kw: dict, dtype: torch.dtype, max_len: int = 320, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(name, num_items=NUM_ITEMS, d_model=32, max_len=max_len, **kw).to(dtype).eval()


def left_padded(lengths: list[int], total: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, NUM_ITEMS + 1, (len(lengths), total), generator=g)
    for row, n in enumerate(lengths):
        items[row, : total - n] = 0
    return items


def reference_hidden(model, items: torch.Tensor) -> torch.Tensor:
    """What the hidden state at each position MEANS: the parallel forward (a prefix for window models)."""
    if model.loss_positions == "all":
        return model(items)
    out = torch.zeros(*items.shape, model.d_model, dtype=model.item_table()[0].dtype)
    for t in range(items.shape[1]):
        out[:, t] = model(items[:, : t + 1])[:, -1]
    return out


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
def test_step_matches_parallel_forward_at_every_position(name: str, kw: dict, dtype: torch.dtype, tol: float) -> None:
    model = make(name, kw, dtype)
    lengths_to_check = LENGTHS if kw.get("causal", True) else [1, 2, 17, 64]
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
                assert err <= tol, f"{name} L={total} t={t}: |step - forward| = {err:.2e}"
            # prefill (parallel) reaches the same state as stepping one event at a time
            prefilled = model.state_rows(model.prefill(items)).double()
            assert (prefilled - model.state_rows(state).double()).abs().max().item() <= tol


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
def test_left_padding_is_invisible(name: str, kw: dict) -> None:
    model = make(name, kw, torch.float64)
    items = left_padded([20], 20)
    padded = torch.nn.functional.pad(items, (37, 0))
    with torch.no_grad():
        assert torch.allclose(model(items)[:, -1], model(padded)[:, -1], atol=1e-10, rtol=0)


def test_window_models_step_over_the_last_max_len_items() -> None:
    model = make("sasrec", {}, torch.float64, max_len=16)
    items = left_padded([40], 40)
    with torch.no_grad():
        state = model.init_state(1)
        for t in range(40):
            state, h = model.step(state, items[:, t])
            window = items[:, max(0, t - 15): t + 1]
            assert torch.allclose(h, model(window)[:, -1], atol=1e-10, rtol=0)
        assert state.tolist() == [items[0, -16:].tolist()]


def test_lru_scan_gradients_are_exact_and_reach_every_parameter() -> None:
    torch.manual_seed(0)
    u_re, u_im = (torch.randn(4, 2, 37, dtype=torch.float64, requires_grad=True) for _ in range(2))
    nu = torch.rand(4, dtype=torch.float64).mul(0.2).add(0.01).requires_grad_()
    theta = torch.rand(4, dtype=torch.float64).mul(6.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c, d: lru_scan(a, b, c, d, chunk=8), (u_re, u_im, nu, theta))
    model = make("lrurec", {}, torch.float32)
    model.train()
    loss = torch.nn.functional.cross_entropy(model.score(model(left_padded([50, 10], 50))).flatten(0, 1)[:, 1:],
                                             torch.randint(0, NUM_ITEMS, (100,)))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        if "token" not in pname and "item_bias" not in pname:
            assert p.grad.abs().sum() > 0, f"no gradient reaches {pname}"


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
def test_state_bytes_round_trip_and_size(name: str, kw: dict) -> None:
    model = make(name, kw, torch.float32)
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


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
def test_scores_never_recommend_padding_or_the_oov_row(name: str, kw: dict) -> None:
    model = make(name, kw, torch.float32)
    with torch.no_grad():
        _, h = model.step(model.init_state(2), torch.tensor([3, model.oov_index]))
        logits = model.score(h)
    assert logits.shape == (2, NUM_ITEMS + 1)
    assert torch.isneginf(logits[:, 0]).all() and torch.isfinite(logits[:, 1:]).all()


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
def test_checkpoint_round_trips_through_the_model_store(name: str, kw: dict, tmp_path) -> None:
    model = make(name, kw, torch.float32, max_len=50)
    store = ModelStore(tmp_path)
    info = store.publish(model, Vocabulary.identity(NUM_ITEMS), metrics={"NDCG@10": 0.1})
    loaded = store.load()
    assert loaded.info.version == info.version == store.current()
    assert loaded.info.hparams == model.hparams() and loaded.info.metrics == {"NDCG@10": 0.1}
    items = left_padded([20, 3], 20)
    with torch.no_grad():
        assert torch.equal(loaded.model(items), model(items))
    assert type(loaded.model) is type(model)


def test_step_is_batch_invariant_bit_for_bit_from_min_rows() -> None:
    """The stream pads every batched step to >= 16 rows; a user's new state must then not depend on who else
    is in the batch (BLAS picks other kernels for tiny M, so fewer rows may differ in the last bit)."""
    model = make("lrurec", {}, torch.float32)
    g = torch.Generator().manual_seed(3)
    states = model.prefill(left_padded([30] * 64, 30))
    items = torch.randint(1, NUM_ITEMS + 1, (64,), generator=g)
    with torch.no_grad():
        full, _ = model.step(states, items)
        for rows in (16, 17, 40):
            pick = torch.randperm(64, generator=g)[:rows]
            part, _ = model.step(states[pick], items[pick])
            assert torch.equal(part, full[pick])


@pytest.mark.parametrize(("name", "kw"), [v for v in VARIANTS if v[1].get("causal", True)],
                         ids=[i for i in IDS if i != "linrec-unmasked"])  # the unmasked form is not served
def test_steps_over_chunks_equal_single_steps_bit_for_bit(name: str, kw: dict) -> None:
    """The worker advances k events per user in one ``steps`` call; however a stream is cut into micro-batches
    (after a crash it is cut differently) the states must be identical, so chunked == one-by-one exactly."""
    model = make(name, kw, torch.float32)
    g = torch.Generator().manual_seed(3)
    users, total = 20, 23
    items = torch.randint(1, 50, (users, total), generator=g)
    with torch.no_grad():
        one = model.init_state(users)
        singles = []
        for t in range(total):
            one, h = model.step(one, items[:, t])
            singles.append(h)
        for cuts in ([23], [1, 22], [5, 7, 11], [9, 14]):
            state, start, hidden = model.init_state(users), 0, []
            for k in cuts:
                ragged = items[:, start: start + k].clone()
                ragged[::3, k // 2:] = 0  # some users have fewer events in this chunk: right padding
                state, h = padded_steps(model, state, ragged)
                rest = items[::3, start + k // 2: start + k]
                if rest.shape[1]:  # ... and get them in a second call, with only those users
                    rows = model.state_rows(state)
                    sub, _ = padded_steps(model, model.state_from_rows(rows[::3]), rest)
                    state = _put_rows(model, state, sub, slice(None, None, 3))
                hidden.append(h)
                start += k
            assert torch.equal(model.state_rows(state), model.state_rows(one)), f"{name} cuts {cuts}"


def _put_rows(model, state, sub, rows):
    full = model.state_rows(state).clone()
    full[rows] = model.state_rows(sub)
    return model.state_from_rows(full)
