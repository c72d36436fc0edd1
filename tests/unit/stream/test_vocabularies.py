"""A worker's vocabularies of other versions (stream/vocabularies.py): one the serving vocabulary extends is the
serving vocabulary itself, never a second copy; others are read from the store; a swap seeds the version served
until then."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import LRURecConfig, build_model
from models.store import ModelStore
from models.vocab import Vocabulary
from stream.serving import Serving
from stream.vocabularies import OlderVocabularies


def _serving(store: ModelStore, items: list[str]) -> Serving:
    torch.manual_seed(0)
    model, vocab = build_model(LRURecConfig(d_model=8, num_layers=1, max_len=10), len(items)), Vocabulary(items)
    return Serving(model, vocab, store.publish(model, vocab).version)


@pytest.fixture
def versions(tmp_path: Path) -> tuple[ModelStore, Serving, Serving]:
    store = ModelStore(tmp_path / "models")
    return store, _serving(store, ["a", "b", "c"]), _serving(store, ["a", "b", "c", "d", "e"])


def test_an_older_vocabulary_the_serving_one_extends_is_the_serving_one(
        versions: tuple[ModelStore, Serving, Serving]) -> None:
    store, old, new = versions
    serving = new
    olders = OlderVocabularies(store, lambda: serving)
    vocab = olders(old.version)
    assert vocab is new.vocab and [vocab.item_of(i) for i in (1, 2, 3)] == ["a", "b", "c"]
    serving = old  # a rollback: the newer version's vocabulary is not a prefix of the serving one
    olders.swapped(new, old)
    newer = olders(new.version)
    assert newer is not old.vocab and newer.item_of(5) == "e"


def test_a_swap_answers_for_the_version_served_until_then_without_reading_the_store(
        versions: tuple[ModelStore, Serving, Serving], monkeypatch: pytest.MonkeyPatch) -> None:
    store, old, new = versions
    olders = OlderVocabularies(store, lambda: new)
    monkeypatch.setattr(store, "vocabulary", lambda version: pytest.fail(f"read {version}"))
    olders.swapped(old, new)
    assert olders(old.version) is new.vocab


def test_only_the_last_few_are_kept(versions: tuple[ModelStore, Serving, Serving],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store, old, new = versions
    olders = OlderVocabularies(store, lambda: None, keep=1)
    reads: list[str] = []
    real = store.vocabulary
    monkeypatch.setattr(store, "vocabulary", lambda version: reads.append(version) or real(version))
    for version in (old.version, old.version, new.version, old.version):
        olders(version)
    assert reads == [old.version, new.version, old.version]
