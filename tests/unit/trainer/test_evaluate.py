"""Full ranking with bounded memory: evaluation and the gate score a few rows at a time, with the same ranks."""

from __future__ import annotations

import pytest
import torch

import trainer.evaluate
from lrustream.bench.training import LargestTensor
from models import LRURecConfig, build_model
from models.vocab import Vocabulary
from trainer.buffer import HeldEvent
from trainer.evaluate import evaluate, ranks_of, score_ranks
from trainer.gate import event_metrics


def test_ranks_scored_in_chunks_are_those_of_one_pass() -> None:
    torch.manual_seed(0)
    model = build_model(LRURecConfig(d_model=8, max_len=6), 50).eval()
    x = torch.randint(0, 51, (23, 6))
    y = torch.randint(1, 51, (23,))
    with torch.no_grad():
        h = model.last_hidden(x)
        whole = ranks_of(model.score(h), x, y)
        for budget in (1, 51 * 4, 51 * 7 + 3, 10**6):
            assert torch.equal(score_ranks(model, h, x, y, budget=budget), whole)


@pytest.fixture
def big_model(monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    """200,000 items and a score budget of 1 M floats (5 rows at a time)."""
    monkeypatch.setattr(trainer.evaluate, "SCORE_BUDGET", 1 << 20)
    torch.manual_seed(0)
    return build_model(LRURecConfig(d_model=8, max_len=10), 200_000).eval()


def test_evaluation_at_200000_items_holds_a_few_rows_of_scores_at_once(big_model: torch.nn.Module) -> None:
    users = 40  # one batch: 32 MB of scores in one pass
    x = torch.randint(1, 200_001, (users, 10))
    y = torch.randint(1, 200_001, (users,))
    with LargestTensor() as largest:
        metrics = evaluate(big_model, x, y, batch_size=64)
    assert largest.bytes <= (1 << 20) * 4 < users * 200_001 * 4
    assert 0 <= metrics["NDCG@10"] <= 1


def test_the_gate_at_200000_items_holds_a_few_rows_of_scores_at_once(big_model: torch.nn.Module) -> None:
    vocab = Vocabulary([str(i) for i in range(1, 200_001)])
    g = torch.Generator().manual_seed(1)
    held = [HeldEvent(user=f"u{e % 7}", prefix=[str(int(i)) for i in torch.randint(1, 200_001, (8,), generator=g)],
                      target=str(int(torch.randint(1, 200_001, (1,), generator=g)))) for e in range(40)]
    with LargestTensor() as largest:
        hit, ndcg = event_metrics(big_model, vocab, held, context=10)
    assert largest.bytes <= (1 << 20) * 4 < len(held) * 200_001 * 4
    assert len(hit) == len(ndcg) == 40
