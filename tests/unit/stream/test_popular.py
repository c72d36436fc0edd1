"""stream/popular.py: recency-weighted popularity, as its docstring defines it."""

from __future__ import annotations

import numpy as np
import pytest

from stream.popular import SEED_TOP_WEIGHT, Popularity


def test_an_event_counts_half_as_much_one_half_life_later_and_ties_go_by_id() -> None:
    pop = Popularity(half_life_s=60.0, now=0.0)
    pop.observe(np.array([3, 3, 5, 0, -2]), now=0.0)  # ids <= 0 (padding, unknown items) are not items
    pop.observe(np.array([5, 7, 9]), now=60.0)
    ids, weights = pop.top(10, num_items=9, now=60.0)
    assert dict(zip(ids, weights, strict=True)) == pytest.approx({3: 1.0, 5: 1.5, 7: 1.0, 9: 1.0})
    assert ids == [5, 3, 7, 9]


def test_excluded_items_and_items_beyond_the_vocabulary_are_never_returned() -> None:
    pop = Popularity(half_life_s=60.0, now=0.0)
    pop.observe(np.array([1, 1, 1, 2, 2, 4, 12]), now=0.0)
    assert pop.top(2, num_items=10, excluded=np.array([1, 50]), now=0.0)[0] == [2, 4]
    assert pop.top(10, num_items=10, now=0.0)[0] == [1, 2, 4]  # 12 is beyond a (rolled back) 10-item vocabulary
    assert Popularity(60.0).top(5, num_items=10) == ([], [])


def test_weights_are_rescaled_long_after_the_start_without_changing_the_ranking() -> None:
    pop = Popularity(half_life_s=1.0, now=0.0)
    pop.observe(np.array([1, 1, 2]), now=0.0)
    pop.observe(np.array([2, 2]), now=400.0)  # 2 ** 400 > 1e100: rescaled
    ids, weights = pop.top(2, num_items=5, now=400.0)
    assert ids == [2, 1] and weights == pytest.approx([2.0, 2.0 * 2.0 ** -400], rel=1e-9)
    assert np.isfinite(pop._weights).all()


def test_a_seed_fills_the_ranking_beyond_the_items_seen_live_and_never_outranks_a_fresh_event() -> None:
    pop = Popularity(half_life_s=60.0, now=0.0)
    pop.seed(np.arange(1, 21), np.arange(20, 0, -1) * 100.0)  # item 1 the most frequent, 20 the least
    pop.observe(np.array([15, 18]), now=0.0)
    ids, weights = pop.top(10, num_items=20, now=0.0)
    assert ids == [15, 18, 1, 2, 3, 4, 5, 6, 7, 8]  # seen live first (seed breaks their tie), then the seed
    assert weights[2] == pytest.approx(SEED_TOP_WEIGHT)
    assert pop.top(3, num_items=20, now=600.0)[0] == [1, 2, 3]  # ten half-lives later, quiet: the seed again
    pop.seed(np.array([], dtype=np.int64), np.array([]))  # a version without the note: live weights alone
    assert pop.top(10, num_items=20, now=0.0)[0] == [15, 18]


def test_a_version_seeds_as_many_items_as_a_request_may_ask_for() -> None:
    from models.store import POPULAR_SEED_ITEMS
    from stream.worker import MAX_REQUEST_K

    assert POPULAR_SEED_ITEMS == MAX_REQUEST_K
