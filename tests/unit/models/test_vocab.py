"""The item vocabulary: what vocab.json holds round-trips, duplicates are refused, and a vocabulary read from JSON
behaves as one built item by item, within the memory per item that online.max_items documents."""

from __future__ import annotations

import gc
import json
import tracemalloc

import pytest

from models.vocab import Vocabulary


def test_a_vocabulary_read_from_json_is_the_one_that_was_written() -> None:
    built = Vocabulary(["b", "a", "c", "a"])
    read = Vocabulary.from_json(json.loads(json.dumps(built.to_json())))
    assert read.items() == built.items() == ["b", "a", "c"] and len(read) == 3
    assert [read.get(x) for x in ("b", "a", "c", "zz")] == [1, 2, 3, None]
    assert read.item_of(2) == "a" and read.items_of([3, 1]) == ["c", "b"] and "c" in read
    assert built.is_prefix_of(read) and read.is_prefix_of(built)
    assert read.add("d") == 4 and read.add("a") == 2 and read.items()[-1] == "d"
    with pytest.raises(KeyError):
        read.item_of(0)
    with pytest.raises(KeyError):
        read.items_of([1, 5])


def test_from_json_refuses_duplicates_and_anything_but_a_list() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary.from_json(["a", "b", "a"])
    with pytest.raises(TypeError):
        Vocabulary.from_json({"a": 1})  # type: ignore[arg-type]
    assert Vocabulary.from_json([7, "8"]).items() == ["7", "8"], "ids written as numbers read as strings"
    assert len(Vocabulary.from_json([])) == 0


def test_from_json_keeps_the_lists_strings_instead_of_copying_them() -> None:
    data = json.loads(json.dumps([f"item-{i}" for i in range(100)]))
    vocab = Vocabulary.from_json(data)
    assert all(a is b for a, b in zip(vocab.items(), data, strict=True))


def test_identity_numbers_items_as_their_ids() -> None:
    vocab = Vocabulary.identity(5)
    assert vocab.items() == ["1", "2", "3", "4", "5"] and vocab.id_of("4") == 4


def test_a_vocabulary_costs_at_most_the_documented_bytes_per_item() -> None:
    """online.max_items says about 130 bytes an item for ids of up to 7 characters (docs/operations.md)."""
    n = 200_000
    blob = json.dumps([f"i{k}" for k in range(1, n + 1)])
    gc.collect()
    tracemalloc.start()
    try:
        vocab = Vocabulary.from_json(json.loads(blob))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(vocab) == n and held / n < 140, f"{held / n:.0f} bytes an item"
