"""Approximate top-K (stream/retrieval.py) as serving uses it (stream/serving.py): exclusions stay exact, scores
are the model's own, a row the index leaves short is ranked exactly, and nprobe is set by measured recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import LRURecConfig, build_model
from models.base import SeqRecModel
from models.vocab import Vocabulary
from stream.retrieval import ANY_ROWS, IndexSettings, ItemIndex, exact_top_ids, recall_at
from stream.serving import Serving

ITEMS = 4000
D = 16


def _clustered_model(seed: int = 0) -> SeqRecModel:
    """A model whose item table has the structure a trained one has: items gathered around a few dozen
    directions, with a bias per item."""
    torch.manual_seed(seed)
    model = build_model(LRURecConfig(d_model=D, num_layers=1, max_len=30), ITEMS)
    centres = torch.randn(40, D)
    with torch.no_grad():
        emb, bias = model.item_table()
        emb[1: ITEMS + 1] = centres[torch.randint(0, 40, (ITEMS,))] + 0.3 * torch.randn(ITEMS, D)
        if bias is not None:
            bias[1: ITEMS + 1] = 0.1 * torch.randn(ITEMS)
    for p in model.parameters():
        p.requires_grad_(False)  # as Serving.load leaves a served model
    return model.eval()


@pytest.fixture(scope="module")
def served() -> tuple[Serving, Serving]:
    """The same version served exactly and through an index (recall target 0.99)."""
    model = _clustered_model()
    vocab = Vocabulary([f"i{i}" for i in range(ITEMS)])
    exact = Serving(model, vocab, "v1")
    index = ItemIndex.build(model, IndexSettings(above_items=0, recall=0.99))
    index.max_rows = ANY_ROWS  # at this size exact ranking is faster: the index is forced, to be tested
    return exact, Serving(model, vocab, "v1", index=index)


def _requests(n: int, seed: int, model: SeqRecModel | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states (the model's outputs after random windows), the left-padded windows (some long, some empty)
    and a mask of 'blocked' columns."""
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(1, ITEMS + 1, (n, 30), generator=g)
    lengths = torch.randint(0, 31, (n,), generator=g)
    windows[torch.arange(30)[None, :] < (30 - lengths)[:, None]] = 0
    with torch.inference_mode():
        h = (model or _clustered_model()).last_hidden(windows.clamp(min=0)).clone()
    return h, windows, torch.randint(1, ITEMS + 1, (50,), generator=g)


def test_the_index_is_built_with_the_recall_it_was_asked_for(served: tuple[Serving, Serving]) -> None:
    index = served[1].index
    assert index is not None and 1 <= index.nprobe <= index.nlist
    assert index.recall >= 0.99 or index.nprobe == index.nlist


def test_no_window_blocked_or_excluded_item_is_ever_returned(served: tuple[Serving, Serving],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _, approximate = served
    calls = []
    real = approximate.index.top  # type: ignore[union-attr]
    monkeypatch.setattr(approximate.index, "top", lambda *a: calls.append(1) or real(*a))
    for seed in range(5):
        h, windows, masked = _requests(64, seed)
        scores, ids = approximate.top_ids(h, windows, 10, 16, masked)
        assert ids.shape == (64, 10) and bool(torch.isfinite(scores).all())
        for row in range(64):
            returned = set(ids[row].tolist())
            assert not returned & set(windows[row].tolist()), "a window item came back"
            assert not returned & set(masked.tolist()), "a masked item came back"
            assert 0 not in returned and ITEMS + 1 not in returned
    assert len(calls) == 5  # ranked through the index, not exactly


def test_scores_are_the_models_own_and_agree_with_exact_ranking(served: tuple[Serving, Serving]) -> None:
    exact, approximate = served
    h, windows, masked = _requests(200, 7)
    a_scores, a_ids = approximate.top_ids(h, windows, 10, 16, masked)
    e_scores, e_ids = exact.top_ids(h, windows, 10, 16, masked)
    full = approximate.model.score(h)
    torch.testing.assert_close(a_scores, full.gather(1, a_ids), rtol=1e-5, atol=1e-5)
    assert bool((a_scores[:, 0] <= e_scores[:, 0] + 1e-5).all())  # nothing beats the true best
    assert recall_at(a_ids, e_ids) >= 0.95


def test_a_row_the_index_leaves_short_is_ranked_exactly(served: tuple[Serving, Serving]) -> None:
    exact, approximate = served
    h, windows, _ = _requests(8, 3)
    # every item but twelve is blocked: the index's candidates (at most 1024) are nearly all excluded
    keep = torch.randperm(ITEMS, generator=torch.Generator().manual_seed(1))[:12] + 1
    masked = torch.tensor(sorted(set(range(1, ITEMS + 1)) - set(keep.tolist())))
    a_scores, a_ids = approximate.top_ids(h, windows, 10, 16, masked)
    e_scores, e_ids = exact.top_ids(h, windows, 10, 16, masked)
    assert torch.equal(a_ids[torch.isfinite(e_scores)], e_ids[torch.isfinite(e_scores)])
    assert set(a_ids[torch.isfinite(a_scores)].tolist()) <= set(keep.tolist())


def test_the_index_alone_would_have_been_short_so_serving_fell_back(served: tuple[Serving, Serving]) -> None:
    _, approximate = served
    index = approximate.index
    assert index is not None
    h, windows, _ = _requests(8, 3)
    keep = torch.randperm(ITEMS, generator=torch.Generator().manual_seed(1))[:12] + 1
    masked = torch.tensor(sorted(set(range(1, ITEMS + 1)) - set(keep.tolist())))
    _, _, short = index.top(approximate.model, h, windows, 10, masked)
    assert bool(short.any())


def test_a_rows_answer_does_not_depend_on_the_rows_beside_it(served: tuple[Serving, Serving]) -> None:
    _, approximate = served
    h, windows, masked = _requests(40, 11)
    together = approximate.top_ids(h, windows, 10, 16, masked)
    for row in (0, 17, 39):
        alone = approximate.top_ids(h[row: row + 1], windows[row: row + 1], 10, 16, masked)
        assert torch.equal(alone[1][0], together[1][row])
        assert torch.equal(alone[0][0], together[0][row])


def test_small_catalogues_stay_exact() -> None:
    settings = IndexSettings(above_items=5000, recall=0.99)
    assert not settings.wants_index(5000) and settings.wants_index(5001)
    assert not IndexSettings(above_items=-1, recall=0.99).wants_index(10**7)


def test_exact_top_ids_excludes_the_window() -> None:
    model = _clustered_model(1)
    h = torch.randn(5, D)
    windows = exact_top_ids(model, h, None, 3)
    again = exact_top_ids(model, h, windows, 3)
    assert not (again[:, :, None] == windows[:, None, :]).any()
    assert np.isclose(recall_at(windows, windows), 1.0)


@pytest.mark.parametrize(("index_ms", "exact_ms", "rows"), [
    ((1.0, 10.0), (2.0, 20.0), ANY_ROWS),  # faster at 16 rows and at 128: every call
    ((1.0, 30.0), (2.0, 20.0), 45),  # faster at 16 rows only: calls up to sqrt(16 x 128) rows
    ((3.0, 30.0), (2.0, 20.0), 0),  # never faster: not used
])
def test_the_index_serves_the_calls_it_was_timed_faster_for(
        served: tuple[Serving, Serving], monkeypatch: pytest.MonkeyPatch, index_ms: tuple[float, float],
        exact_ms: tuple[float, float], rows: int) -> None:
    from stream import retrieval

    model, index = served[1].model, served[1].index
    assert index is not None
    monkeypatch.setattr(retrieval, "_seconds", lambda call, m, h, w, k, *rest: (
        (index_ms if call == index.top else exact_ms)[0 if len(h) == 16 else 1] / 1000))
    h, windows, _ = _requests(256, 5)
    assert retrieval._rows_it_pays_for(index, model, h, windows, 10) == rows


def test_a_version_whose_index_never_pays_is_served_exactly(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.store import ModelStore
    from stream import retrieval

    store = ModelStore(tmp_path / "models")
    store.publish(_clustered_model(2), Vocabulary([f"i{i}" for i in range(ITEMS)]))
    settings = IndexSettings(above_items=0, recall=0.9)
    monkeypatch.setattr(retrieval, "_rows_it_pays_for", lambda *a: 0)
    assert Serving.load(store, index=settings).index is None
    monkeypatch.setattr(retrieval, "_rows_it_pays_for", lambda *a: 64)
    loaded = Serving.load(store, index=settings).index
    assert loaded is not None and loaded.used_for(64) and not loaded.used_for(65)  # as measured
    assert Serving.load(store, index=IndexSettings(above_items=ITEMS, recall=0.9)).index is None
