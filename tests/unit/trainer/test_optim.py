"""The optimiser with sparse gradients: AdamW on the rows a gradient holds, clipping that counts them."""

from __future__ import annotations

import torch

from trainer.optim import clip_gradients, optimizer_step


class _Table(torch.nn.Module):
    """A table and a dense weight, as a model's item table and the rest of it."""

    def __init__(self, rows: int = 6, width: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(rows, width, generator=g))
        self.other = torch.nn.Parameter(torch.randn(width, generator=g))


def _adamw(m: _Table) -> torch.optim.AdamW:
    return torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.01, eps=1e-9)


def _sparse(rows: list[int], values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, shape, check_invariants=True)


def test_a_sparse_step_touching_every_row_is_adamw() -> None:
    lazy, dense = _Table(), _Table()
    opts = [_adamw(lazy), _adamw(dense)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grad = torch.randn(6, 3, generator=g)
        other = torch.randn(3, generator=g)
        lazy.table.grad = _sparse([5, 0, 1, 2, 3, 4, 0], torch.cat([grad[[5, 0, 1, 2, 3, 4]], grad[:1] * 0]),
                                  lazy.table.shape)  # unsorted, one row twice: coalesced before the update
        dense.table.grad, lazy.other.grad, dense.other.grad = grad, other.clone(), other.clone()
        optimizer_step(opts[0])
        opts[1].step()
    for a, b in zip(lazy.parameters(), dense.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.allclose(opts[0].state[lazy.table][key], opts[1].state[dense.table][key], rtol=0, atol=1e-7)


def test_a_sparse_step_leaves_the_other_rows_and_their_moments_alone() -> None:
    m = _Table()
    opt = _adamw(m)
    m.table.grad = torch.ones(6, 3)
    opt.step()  # every row has moments now
    before = m.table.detach().clone(), opt.state[m.table]["exp_avg"].clone()
    m.table.grad = _sparse([1, 4], torch.ones(2, 3), m.table.shape)
    optimizer_step(opt)
    moved = (m.table != before[0]).any(1)
    assert moved.tolist() == [False, True, False, False, True, False]
    assert ((opt.state[m.table]["exp_avg"] != before[1]).any(1) == moved).all()
    assert m.table.grad is None


def test_clipping_counts_sparse_gradients_as_their_dense_equivalent() -> None:
    sparse, dense = _Table(), _Table()
    values = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 12.0]])
    sparse.table.grad = _sparse([2, 2, 5], values, sparse.table.shape)  # row 2 twice: it counts as (3, 4, 0)
    dense.table.grad = sparse.table.grad.to_dense()
    sparse.other.grad, dense.other.grad = torch.ones(3), torch.ones(3)
    norm = clip_gradients(sparse, 1.0)
    assert torch.allclose(norm, torch.nn.utils.clip_grad_norm_(dense.parameters(), 1.0))
    assert torch.allclose(norm, torch.tensor((25.0 + 144 + 3) ** 0.5))
    assert torch.allclose(sparse.table.grad.to_dense(), dense.table.grad)
    assert torch.allclose(sparse.other.grad, dense.other.grad)
