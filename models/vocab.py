"""Item vocabulary: external item ids (strings, as producers send them) <-> dense model ids 1..N.

Id 0 is padding and N + 1 the model's out-of-vocabulary row. Vocabularies only grow by appending, so a model id
keeps its meaning across versions and an older vocabulary is a prefix of a newer one.
"""

from __future__ import annotations

from collections.abc import Iterable


class Vocabulary:
    def __init__(self, items: Iterable[str] = ()) -> None:
        self._ids: dict[str, int] = {}
        self._items: list[str] = [""]  # index 0 = padding
        for item in items:
            self.add(item)

    def __len__(self) -> int:
        """Number of real items N (padding excluded)."""
        return len(self._items) - 1

    def __contains__(self, item: object) -> bool:
        return item in self._ids

    def add(self, item: str) -> int:
        item = str(item)
        idx = self._ids.get(item)
        if idx is None:
            idx = len(self._items)
            self._ids[item] = idx
            self._items.append(item)
        return idx

    def get(self, item: str, default: int | None = None) -> int | None:
        return self._ids.get(item, default)

    def id_of(self, item: str) -> int:
        return self._ids[item]

    def item_of(self, idx: int) -> str:
        if not 0 < idx < len(self._items):
            raise KeyError(idx)
        return self._items[idx]

    def items_of(self, ids: list[int]) -> list[str]:
        """``item_of`` for many ids at once."""
        if ids and not 0 < min(ids) <= max(ids) < len(self._items):
            raise KeyError(next(i for i in ids if not 0 < i < len(self._items)))
        items = self._items
        return [items[i] for i in ids]

    def items(self) -> list[str]:
        """External ids in model-id order (model id = position + 1)."""
        return self._items[1:]

    def is_prefix_of(self, other: Vocabulary) -> bool:
        return other._items[: len(self._items)] == self._items

    def to_json(self) -> list[str]:
        return self.items()

    @classmethod
    def from_json(cls, data: list[str]) -> Vocabulary:
        """The vocabulary ``to_json`` wrote: distinct items in model-id order (ValueError on a duplicate). The
        list's strings become the vocabulary's, not copies of them."""
        if not isinstance(data, list):
            raise TypeError(f"a vocabulary is a JSON list of item ids, not {type(data).__name__}")
        if set(map(type, data)) - {str}:  # ids written as numbers
            data = [str(item) for item in data]
        vocab = cls()
        vocab._ids = dict(zip(data, range(1, len(data) + 1), strict=True))  # built in C, no Python call per item
        if len(vocab._ids) != len(data):
            raise ValueError("vocabulary has duplicate item ids")
        vocab._items = ["", *data]
        return vocab

    @classmethod
    def identity(cls, num_items: int) -> Vocabulary:
        """External id == model id, for data sets already numbered 1..N (LRURec's preprocessed files)."""
        return cls.from_json([str(i) for i in range(1, num_items + 1)])
