"""state/record.py: the window of a user record, pushed item by item or several items at once."""

from __future__ import annotations

import random

import numpy as np
import pytest

from state.record import push_item, push_items


def _pushed(items: list[int | str], max_len: int, window: np.ndarray | None = None, unknown: list[str] | None = None
            ) -> tuple[np.ndarray, list[str]]:
    window, unknown = (np.zeros(0, dtype=np.int32) if window is None else window), list(unknown or [])
    for x in items:
        window, unknown = push_item(window, unknown, x, max_len)
    return window, unknown


@pytest.mark.parametrize("unknown_share", [0.0, 0.1, 0.5])
def test_pushing_items_at_once_equals_pushing_them_one_by_one(unknown_share: float) -> None:
    rng = random.Random(0)
    for _ in range(200):
        n, max_len = rng.randrange(0, 40), rng.randrange(1, 12)
        items: list[int | str] = [f"x{rng.randrange(6)}" if rng.random() < unknown_share else rng.randrange(1, 50)
                                  for _ in range(n)]
        window, unknown = push_items(np.zeros(0, dtype=np.int32), [], items, max_len)
        expected_window, expected_unknown = _pushed(items, max_len)
        assert window.dtype == np.int32 and window.tolist() == expected_window.tolist()
        assert unknown == expected_unknown
        # onto a window that already holds items (a served micro-batch)
        before = _pushed(items[: n // 2], max_len)
        window, unknown = push_items(before[0], before[1], items[n // 2:], max_len)
        expected_window, expected_unknown = _pushed(items[n // 2:], max_len, *before)
        assert window.dtype == np.int32 and window.tolist() == expected_window.tolist()
        assert unknown == expected_unknown
