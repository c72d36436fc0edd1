"""The model version a worker serves: weights, vocabulary and version id, loaded only through the model store.

Swapping is replacing one ``Serving`` by another between micro-batches; states made by another version are
re-derived from their stored item window (see stream/processor.py), never advanced with the new weights.

Ranking is exact (one product with the whole item table) up to ``stream.approximate_above_items`` items; above
it a version gets an approximate index (stream/retrieval.py, :meth:`Serving.attach_index`), and ranking asks the
index for candidates, with the same exclusions and exact scores, falling back to the exact product for a row the
index leaves short.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from models.base import SeqRecModel
from models.store import ModelStore, popular_seed
from models.vocab import Vocabulary
from stream.retrieval import IndexSettings, ItemIndex


@dataclass
class Serving:
    model: SeqRecModel
    vocab: Vocabulary
    version: str
    popular: dict[str, float] = field(default_factory=dict)
    """Item counts of the data the version was trained on (its ``"popular"`` note; empty without one): the
    seed of the worker's popular fallback (stream/popular.py)."""
    index: ItemIndex | None = None
    """The approximate top-K index over the item table (None: every ranking is exact)."""
    index_tried: bool = False
    """Whether :meth:`attach_index` has run for this version (a worker builds each version's index once)."""

    @classmethod
    def load(cls, store: ModelStore, version: str | None = None, index: IndexSettings | None = None) -> Serving:
        """Load and verify a version (checksums, shapes, finite weights): ModelStoreError when refused. With
        ``index`` settings that want one for this catalogue, the approximate index is built before returning."""
        loaded = store.load(version)
        loaded.model.eval()
        for p in loaded.model.parameters():
            p.requires_grad_(False)
        serving = cls(loaded.model, loaded.vocab, loaded.info.version, popular_seed(loaded.info))
        if index is not None:
            serving.attach_index(index)
        return serving

    def attach_index(self, settings: IndexSettings) -> ItemIndex | None:
        """Build the approximate index when ``settings`` want one for this catalogue (else None), and rank through
        it from then on if it is faster than exact ranking for some calls (``max_rows`` > 0; otherwise it is
        returned but not kept). Seconds to a minute at a million items: a worker swaps to a version first and
        runs this off the serving path, so the version is served, exactly, while its index is built."""
        self.index_tried = True
        if not settings.wants_index(self.num_items):
            return None
        ids, counts = self.popular_ids()
        built = ItemIndex.build(self.model, settings, (ids, counts) if len(ids) else None)
        if built.max_rows:
            self.index = built
        return built

    def popular_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """The popularity seed as (internal ids, counts), items this vocabulary lacks left out."""
        pairs = [(i, c) for item, c in self.popular.items()
                 if (i := self.vocab.get(item)) is not None and 0 < i <= self.num_items]
        return (np.array([i for i, _ in pairs], dtype=np.int64), np.array([c for _, c in pairs], dtype=np.float64))

    @property
    def num_items(self) -> int:
        return self.model.num_items

    def internal_ids(self, external: list[str]) -> torch.Tensor:
        """External item ids -> internal ids; items this vocabulary lacks map to the OOV row."""
        oov = self.model.oov_index
        return torch.tensor([self.vocab.get(x, oov) or oov for x in external], dtype=torch.long)

    def top_ids(self, h: torch.Tensor, windows: torch.Tensor | None, k: int, min_rows: int,
                masked: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of ``h`` [n, d], the ``k`` best scores and internal ids [n, k], best first, never an item of
        the row's ``windows`` [n, L] (internal ids; None: none excluded) nor a column in ``masked`` (those score
        -inf, which is what a row with fewer than ``k`` items left ends with). Scored ``min_rows`` rows at a time
        at least, so that a row's scores never depend on how many rows share the call (what
        models.base.padded_steps does for steps): an event's recommendation and a request's for the same state
        are the same numbers."""
        index = self.index  # attached by another thread at any time: read once
        if index is not None and index.used_for(h.shape[0]):
            return self._approximate_top_ids(index, h, windows, k, min_rows, masked)
        return self._exact_top_ids(h, windows, k, min_rows, masked)

    def _exact_top_ids(self, h: torch.Tensor, windows: torch.Tensor | None, k: int, min_rows: int,
                       masked: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        n = h.shape[0]
        if n < min_rows:
            h = torch.cat([h, h.new_zeros(min_rows - n, h.shape[1])])
        scores = self.model.score(h)[:n]
        if windows is not None:
            scores.scatter_(1, windows, float("-inf"))
        if masked is not None:
            scores[:, masked] = float("-inf")
        return torch.topk(scores, min(k, self.num_items), dim=1)

    def _approximate_top_ids(self, index: ItemIndex, h: torch.Tensor, windows: torch.Tensor | None, k: int,
                             min_rows: int, masked: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The index's answer (stream/retrieval.py), rows it leaves short ranked exactly."""
        scores, ids, short = index.top(self.model, h, windows, min(k, self.num_items), masked)
        if bool(short.any()):
            rows = short.nonzero().squeeze(1)
            exact_scores, exact_ids = self._exact_top_ids(
                h[rows], None if windows is None else windows[rows], k, min_rows, masked)
            scores[rows], ids[rows] = exact_scores, exact_ids
        return scores, ids

    def top(self, h: torch.Tensor, windows: torch.Tensor | None, k: int, min_rows: int,
            masked: torch.Tensor | None = None) -> list[tuple[list[str], list[float]]]:
        """:meth:`top_ids` as external ids and scores rounded to 6 places, without the excluded items (fewer
        than ``k`` when fewer are left)."""
        top_scores, top_items = self.top_ids(h, windows, k, min_rows, masked)
        kept = top_scores != float("-inf")
        kept_rows = None if bool(kept.all()) else kept.tolist()  # some row has fewer than k items left
        rounded = np.round(top_scores.double().numpy(), 6).tolist()
        names = self.vocab.items_of(top_items[kept].tolist())  # row by row, one check
        out, start = [], 0
        for row, scores_of_row in enumerate(rounded):
            if kept_rows is not None:
                scores_of_row = [sc for sc, keep in zip(scores_of_row, kept_rows[row], strict=True) if keep]
            out.append((names[start:start + len(scores_of_row)], scores_of_row))
            start += len(scores_of_row)
        return out
