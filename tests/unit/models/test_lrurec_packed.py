"""LRURec's packed ``steps`` (the worker's path: CPU, no gradient, events before padding) against the plain one:
the same bits for every real position and every state, whatever the users' event counts."""

from __future__ import annotations

import pytest
import torch

import models.lrurec
from models.base import padded_steps
from models.lrurec import LRURec, LRURecConfig


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return LRURec(LRURecConfig(d_model=64, num_layers=2, max_len=50), 500).eval()


def _batch(counts: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    items = torch.zeros(len(counts), max(counts), dtype=torch.long)
    for row, n in enumerate(counts):
        items[row, :n] = torch.randint(1, 501, (n,), generator=g)
    return items


@pytest.mark.parametrize("counts", [[1], [3, 1, 0, 2], [40, 1, 1, 2, 7, 0, 1], [5] * 20, [1] * 17])
def test_packed_steps_equal_plain_steps_bit_for_bit(counts: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    items = _batch(counts, seed=len(counts))
    g = torch.Generator().manual_seed(1)
    state = torch.randn(len(counts), 2, 2, 128, generator=g) * 0.1
    with torch.inference_mode():
        assert models.lrurec._packable(state, items > 0)
        packed_state, packed_hidden = padded_steps(model, state, items)
        monkeypatch.setattr(models.lrurec, "_packable", lambda state, mask: False)
        plain_state, plain_hidden = padded_steps(model, state, items)
    assert torch.equal(packed_state, plain_state)
    real = items > 0
    assert torch.equal(packed_hidden[real], plain_hidden[real])


def test_a_mask_with_holes_is_not_packed() -> None:
    state = torch.zeros(2, 2, 2, 128)
    assert not models.lrurec._packable(state, torch.tensor([[True, False, True], [True, True, False]]))
    assert models.lrurec._packable(state, torch.tensor([[True, True, False], [False, False, False]]))


@pytest.mark.parametrize("change", ["in place", "load_state_dict"])
def test_packed_steps_follow_a_change_of_weights(change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The packed path keeps lambda, gamma and the output matrix between batches (LRULayer.serving_parts); a
    weight changed in place (an optimiser step) or loaded must be seen by the next batch."""
    model = _model()
    items = _batch([3, 1, 2], seed=5)
    state = model.init_state(3)
    with torch.inference_mode():
        before = padded_steps(model, state, items)
    other = LRURec(LRURecConfig(d_model=64, num_layers=2, max_len=50), 500).eval()
    with torch.no_grad():
        if change == "in place":
            for layer in (b.lru_layer for b in model.blocks):
                layer.params_log.mul_(1.05)
                layer.out_weight.mul_(0.9)
        else:
            model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        packed = padded_steps(model, state, items)
        monkeypatch.setattr(models.lrurec, "_packable", lambda state, mask: False)
        plain = padded_steps(model, state, items)
    assert not torch.equal(packed[0], before[0])
    assert torch.equal(packed[0], plain[0])
    assert torch.equal(packed[1][items > 0], plain[1][items > 0])
