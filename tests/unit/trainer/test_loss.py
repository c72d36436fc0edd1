"""The training loss: the sampled softmax against the full one, the switch between them, accidental hits, and a
step whose memory does not grow with the catalogue."""

from __future__ import annotations

import copy

import torch

from lrustream.bench.training import LargestTensor, random_batches
from lrustream.kernel.config import TrainConfig, load_config
from models import LRURecConfig, SASRecConfig, build_model
from trainer.loop import run_setup
from trainer.loss import Sampling, catalogue_cross_entropy, sampled_cross_entropy, sequence_loss, uniform_negatives
from trainer.optim import clipped_step, make_optimizer
from trainer.samples import leave_one_out


def _dense(g: torch.Tensor) -> torch.Tensor:
    return g.to_dense() if g.is_sparse else g


def _loss_and_grads(loss: torch.Tensor, params: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [_dense(g) for g in torch.autograd.grad(loss, params)]


def _problem(n: int, rows: int = 300, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(h, item table with padding and OOV rows, bias, labels in 1..n), float64, requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, d, generator=g, dtype=torch.float64).requires_grad_()
    table = torch.randn(n + 2, d, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(n + 2, generator=g, dtype=torch.float64).requires_grad_()
    return h, table, bias, torch.randint(1, n + 1, (rows,), generator=g)


def test_the_sampled_loss_is_the_full_loss_when_every_item_is_drawn() -> None:
    n = 50
    h, table, bias, y = _problem(n)
    drawn, log_count = uniform_negatives(n, n)  # K >= N: every item drawn once, an expected count of 1
    assert log_count == 0.0 and sorted(drawn.tolist()) == list(range(1, n + 1))
    sampled = sampled_cross_entropy(h, table, bias, y, drawn, log_count, chunk=64)
    full = catalogue_cross_entropy(h, table[: n + 1], bias[: n + 1], y)
    assert torch.allclose(sampled, full, rtol=0, atol=1e-12)
    # every label is both an in-batch candidate and a draw: counted twice unless the draw is masked
    for g, r in zip(_loss_and_grads(sampled, (h, table, bias)), _loss_and_grads(full, (h, table, bias)),
                    strict=True):
        assert torch.allclose(g, r, rtol=0, atol=1e-12)


def test_a_model_trained_with_every_item_drawn_gets_the_full_loss_and_gradients() -> None:
    torch.manual_seed(0)
    model = build_model(LRURecConfig(d_model=16, max_len=12), 40).double().eval()  # no dropout
    tokens, labels = random_batches(40, 6, 12, 1)[0]
    labels[0, :5] = 0  # unlabelled positions cost nothing either way
    full = sequence_loss(model, tokens, labels)
    full_grads = _loss_and_grads(full, tuple(model.parameters()))
    sampled = sequence_loss(model, tokens, labels, Sampling(above=0, negatives=40))
    assert model.token.weight.grad is None and not model.token.sparse  # the lookup is dense again after the loss
    sampled_grads = _loss_and_grads(sampled, tuple(model.parameters()))
    assert torch.allclose(sampled, full, rtol=0, atol=1e-10)
    for g, r in zip(sampled_grads, full_grads, strict=True):
        assert torch.allclose(g, r, rtol=0, atol=1e-10)


def test_the_sampled_normaliser_is_unbiased_for_fewer_draws_than_items() -> None:
    """One row: exp(loss + s_y) is the estimated normaliser; its mean over many draws of K = N/5 items is the
    full normaliser (a wrong logQ correction, log(1/N) or none, misses it by a factor of about 5 or 10)."""
    n, k = 50, 10
    h, table, bias, y = _problem(n, rows=1)
    with torch.no_grad():
        h = h * 0.25  # logits of a few units: no single item dominates the normaliser
        s = h @ table[: n + 1].T + bias[: n + 1]
        full = torch.logsumexp(s[0, 1:], 0).exp()
        torch.manual_seed(1)
        estimates = [(sampled_cross_entropy(h, table, bias, y, *uniform_negatives(n, k)) + s[0, y]).exp()
                     for _ in range(4000)]
    assert abs(float(torch.stack(estimates).mean() / full) - 1) < 0.03


def test_the_loss_switches_to_the_sampled_softmax_above_the_threshold() -> None:
    torch.manual_seed(0)
    n = 30
    model = build_model(LRURecConfig(d_model=8, max_len=10), n).eval()
    tokens, labels = random_batches(n, 4, 10, 1)[0]
    full = sequence_loss(model, tokens, labels)
    at = sequence_loss(model, tokens, labels, Sampling(above=n, negatives=3))
    at.backward()
    assert torch.equal(at, full) and not model.token.weight.grad.is_sparse
    model.zero_grad(set_to_none=True)
    above = sequence_loss(model, tokens, labels, Sampling(above=n - 1, negatives=3))
    above.backward()
    assert not torch.equal(above, full) and model.token.weight.grad.is_sparse
    cfg = TrainConfig(sampled_softmax_above=n - 1, negatives=7)
    assert Sampling.of(cfg) == Sampling(above=n - 1, negatives=7)
    split = leave_one_out([torch.arange(1, 8).numpy()], max_len=10)
    assert run_setup(model, split, cfg)["sampled_softmax_negatives"] == 7  # a resumed run must draw alike
    assert "sampled_softmax_negatives" not in run_setup(model, split, TrainConfig(sampled_softmax_above=n))
    defaults = load_config().train
    assert Sampling.of(defaults).applies(200_000) and not Sampling.of(defaults).applies(3_416)  # ML-1M: full


def test_accidental_hits_of_the_labels_among_the_draws_are_masked() -> None:
    n = 40
    h, table, bias, _ = _problem(n, rows=3)
    y = torch.tensor([3, 7, 3])
    log_count = -1.5
    hits = torch.tensor([3, 7, 7, 12, 3, 20])  # 3 and 7 are labels: in-batch candidates already
    clean = torch.tensor([12, 20])
    with_hits = sampled_cross_entropy(h, table, bias, y, hits, log_count)
    without = sampled_cross_entropy(h, table, bias, y, clean, log_count)
    assert torch.allclose(with_hits, without, rtol=0, atol=1e-12)
    for g, r in zip(_loss_and_grads(with_hits, (h, table, bias)), _loss_and_grads(without, (h, table, bias)),
                    strict=True):
        assert torch.allclose(g, r, rtol=0, atol=1e-12)
    # the positive itself as the only draw: the loss is that of the in-batch candidates alone
    only_in_batch = sampled_cross_entropy(h, table, bias, y, torch.tensor([7]), log_count)
    with torch.no_grad():
        s = h @ table[[3, 7]].T + bias[[3, 7]]
        expected = (torch.logsumexp(s, 1) - s.gather(1, torch.tensor([[0], [1], [0]]))[:, 0]).mean()
    assert torch.allclose(only_in_batch, expected, rtol=0, atol=1e-12)


def test_a_training_step_at_200000_items_allocates_no_catalogue_sized_tensor() -> None:
    """Neither logits over the catalogue (positions x items) nor a dense gradient of the item table: the largest
    tensor a step creates is far smaller than the table itself."""
    n, batch, length = 200_000, 4, 20
    torch.manual_seed(0)
    model = build_model(LRURecConfig(d_model=16, num_layers=1, max_len=length), n).train()
    cfg = load_config().train  # the defaults: sampled at this size
    assert Sampling.of(cfg).applies(n)
    opt = make_optimizer(model, cfg)
    sampling = Sampling.of(cfg)
    table = model.token.weight
    untouched = table[n // 2:].detach().clone()
    data = random_batches(n // 2, batch, length, 2)  # items of the first half only: the rest is never used

    def step(tokens: torch.Tensor, labels: torch.Tensor) -> None:
        loss = sequence_loss(model, tokens, labels, sampling)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert int(clipped_step(model, opt, cfg.grad_clip)) == 0

    step(*data[0])  # the first step creates AdamW's moments (table-sized, once)
    with LargestTensor() as largest:
        step(*data[1])
    full_logits_bytes = batch * length * n * 4  # 64 MB
    assert largest.bytes < table.numel() * table.element_size() / 4 < full_logits_bytes
    assert largest.bytes >= batch * length * cfg.negatives * 4  # the sampled logits are there, traced
    # rows neither drawn nor read keep their values (no weight decay, no momentum): at most two steps' draws moved
    changed = (table[n // 2:] != untouched).any(1)
    assert 0 < int(changed.sum()) <= 2 * cfg.negatives


def test_a_model_without_item_bias_trains_with_the_sampled_softmax() -> None:
    torch.manual_seed(0)
    model = build_model(SASRecConfig(d_model=8, max_len=10), 500).train()
    before = copy.deepcopy(model.state_dict())
    cfg = TrainConfig(sampled_softmax_above=100, negatives=16)
    opt = make_optimizer(model, cfg)
    tokens, labels = random_batches(500, 4, 10, 1)[0]
    loss = sequence_loss(model, tokens, labels, Sampling.of(cfg))
    loss.backward()
    assert model.item_embedding.weight.grad.is_sparse
    clipped_step(model, opt, cfg.grad_clip)
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before["item_embedding.weight"], model.item_embedding.weight)
