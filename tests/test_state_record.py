"""state/record.py: the window of a user record, pushed item by item or folded in one pass."""

from __future__ import annotations

import random

import numpy as np
import pytest

from state.record import fold_items, push_item


def _pushed(items: list[int | str], max_len: int) -> tuple[np.ndarray, list[str]]:
    window, unknown = np.zeros(0, dtype=np.int32), []
    for x in items:
        window, unknown = push_item(window, unknown, x, max_len)
    return window, unknown


@pytest.mark.parametrize("unknown_share", [0.0, 0.1, 0.5])
def test_folding_a_window_equals_pushing_its_items_one_by_one(unknown_share: float) -> None:
    rng = random.Random(0)
    for _ in range(200):
        n, max_len = rng.randrange(0, 40), rng.randrange(1, 12)
        items: list[int | str] = [f"x{rng.randrange(6)}" if rng.random() < unknown_share else rng.randrange(1, 50)
                                  for _ in range(n)]
        window, unknown = fold_items(items, max_len)
        expected_window, expected_unknown = _pushed(items, max_len)
        assert window.dtype == np.int32 and window.tolist() == expected_window.tolist()
        assert unknown == expected_unknown
