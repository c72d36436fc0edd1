"""The model version a worker serves: weights, vocabulary and version id, loaded only through the model store.

Swapping is replacing one ``Serving`` by another between micro-batches; states made by another version are
re-derived from their stored item window (see stream/processor.py), never advanced with the new weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.base import SeqRecModel
from models.store import ModelStore
from models.vocab import Vocabulary


@dataclass
class Serving:
    model: SeqRecModel
    vocab: Vocabulary
    version: str

    @classmethod
    def load(cls, store: ModelStore, version: str | None = None) -> Serving:
        """Load and verify a version (checksums, shapes, finite weights): ModelStoreError when refused."""
        loaded = store.load(version)
        loaded.model.eval()
        for p in loaded.model.parameters():
            p.requires_grad_(False)
        return cls(loaded.model, loaded.vocab, loaded.info.version)

    @property
    def num_items(self) -> int:
        return self.model.num_items

    def internal_ids(self, external: list[str]) -> torch.Tensor:
        """External item ids -> internal ids; items this vocabulary lacks map to the OOV row."""
        oov = self.model.oov_index
        return torch.tensor([self.vocab.get(x, oov) or oov for x in external], dtype=torch.long)
