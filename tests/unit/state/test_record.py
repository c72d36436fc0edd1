"""state/record.py: the encoding of a user record (this format and the one before), and its window, pushed item
by item or several items at once."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from state.record import RecordError, UserRecord, push_item, push_items, updated_ms_of


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


def _record() -> UserRecord:
    return UserRecord(b"\x01" * 16, "v7", np.array([3, -1, 5], dtype=np.int32), ["new-item"], 2, 41, 1_700_000_000_123,
                      np.arange(4, dtype=np.float32).tobytes())


def test_a_record_round_trips_with_its_hidden_output() -> None:
    record = _record()
    back = UserRecord.decode(record.encode())
    assert (back.state, back.version, back.window.tolist(), back.unknown, back.partition, back.offset,
            back.updated_ms, back.hidden) == (record.state, "v7", [3, -1, 5], ["new-item"], 2, 41,
                                              1_700_000_000_123, record.hidden)
    assert updated_ms_of(record.encode()) == record.updated_ms


def test_a_format_1_record_still_decodes_without_a_hidden_output() -> None:
    r = _record()
    v1 = b"".join([struct.pack("<BiqqHIH", 1, r.partition, r.offset, r.updated_ms, 2, len(r.state), 1), b"v7", r.state,
                   struct.pack("<I", 3), r.window.astype("<i4").tobytes(), struct.pack("<H", 8), b"new-item"])
    back = UserRecord.decode(v1)
    assert (back.state, back.window.tolist(), back.unknown, back.offset, back.hidden) == (r.state, [3, -1, 5],
                                                                                           ["new-item"], 41, b"")
    assert updated_ms_of(v1) == r.updated_ms


@pytest.mark.parametrize("blob", [b"", b"\x09" + bytes(40), _record().encode()[:-3], _record().encode() + b"x"])
def test_an_unknown_format_or_a_wrong_length_is_refused(blob: bytes) -> None:
    with pytest.raises(RecordError):
        UserRecord.decode(blob)
