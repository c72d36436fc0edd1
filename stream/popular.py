"""The cold-start fallback: recency-weighted item popularity, kept by each worker from the events it applies.

An event at time ``t`` adds ``2 ** (t / half_life)`` to its item's weight, so that at any time ``now`` an item's
weight is the sum of ``2 ** (-(now - t) / half_life)`` over its events: every event counts, a recent one more,
and one ``half_life`` old half as much. Weights are kept scaled (divided by ``2 ** (t0 / half_life)``, ``t0``
moved forward when they grow large), so nothing overflows and the ranking never needs a pass over history.

A worker also holds a *seed*: the item counts of the data the serving version was trained on (its
``"popular"`` note, models/store.py), installed with the version. An item's score is its live weight plus its
seed weight, the seed scaled so that its most frequent item weighs :data:`SEED_TOP_WEIGHT` (half of one fresh
event) and the others in proportion; the seed does not decay. So an item with a live event in the last half-life
ranks above every item known from the seed alone, the seed orders items with equal live weight, fills the
ranking beyond the items seen live (a worker that has seen two events still answers ``k=10`` with ten items),
and takes over again when the stream goes quiet. A version without the note clears the seed: the ranking is the
live weights alone.

A worker knows the items of its own partitions' events only: on a topic with random keys that is a uniform
sample of the whole stream, so every worker's ranking approximates the same one.
"""

from __future__ import annotations

import time

import numpy as np

RESCALE_ABOVE = 1e100  # weights are divided down (t0 moved forward) once a new event's weight passes this
SEED_TOP_WEIGHT = 0.5  # the seed's most frequent item weighs this many fresh events (below one: live ranks first)


class Popularity:
    """Decayed event counts per item column (internal id, the column of the model's scores)."""

    def __init__(self, half_life_s: float, now: float | None = None) -> None:
        self.half_life_s = half_life_s
        self._t0 = time.time() if now is None else now  # weights are scaled as seen from here
        self._weights = np.zeros(0)  # by internal item id; grows as ids appear (vocabularies only append)
        self._seed = np.zeros(0)  # by internal item id, in fresh events (not scaled, never decays)

    def seed(self, items: np.ndarray, counts: np.ndarray) -> None:
        """Replace the seed by ``counts`` of ``items`` (internal ids > 0; others are ignored), scaled so that the
        largest count weighs :data:`SEED_TOP_WEIGHT`; empty ``items`` clears it."""
        items = np.asarray(items, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.float64)
        keep = (items > 0) & np.isfinite(counts) & (counts > 0)
        items, counts = items[keep], counts[keep]
        seed = np.zeros(0 if not len(items) else int(items.max()) + 1)
        if len(items):
            np.add.at(seed, items, counts * (SEED_TOP_WEIGHT / counts.max()))
        self._seed = seed  # whole: a request on another thread reads the old seed or the new one

    def observe(self, items: np.ndarray, now: float | None = None) -> None:
        """Count events of ``items`` (internal ids > 0; others are ignored) at time ``now``."""
        items = items[items > 0]
        if not len(items):
            return
        now = time.time() if now is None else now
        weight = self._weight(now)
        if weight > RESCALE_ABOVE:
            self._weights /= weight
            self._t0, weight = now, 1.0
        top = int(items.max())
        if top >= len(self._weights):
            self._weights = np.concatenate([self._weights, np.zeros(top + 1 - len(self._weights))])
        np.add.at(self._weights, items, weight)

    def top(self, k: int, num_items: int, excluded: np.ndarray | None = None,
            now: float | None = None) -> tuple[list[int], list[float]]:
        """The ``k`` most popular internal ids among ``1..num_items`` not in ``excluded``, most popular first,
        with their weights as of ``now``: live plus seed (items in neither have none, and are not returned)."""
        size = min(num_items + 1, max(len(self._weights), len(self._seed)))
        if size <= 0:
            return [], []
        weights = np.zeros(size)
        live = self._weights[:size]
        weights[: len(live)] = live * (1.0 / self._weight(time.time() if now is None else now))
        seed = self._seed[:size]
        weights[: len(seed)] += seed
        weights[0] = 0.0
        if excluded is not None and len(excluded):
            weights[excluded[excluded < len(weights)]] = 0.0
        k = min(k, int(np.count_nonzero(weights)))
        if k <= 0:
            return [], []
        kth = weights[np.argpartition(-weights, k - 1)[k - 1]]  # the k-th largest weight
        ids = np.flatnonzero(weights >= kth)  # every item tied with it too, so that ties go by id below
        ids = ids[np.lexsort((ids, -weights[ids]))][:k]  # by weight, then id: the same answer on every call
        return ids.tolist(), weights[ids].tolist()

    def _weight(self, t: float) -> float:
        return float(2.0 ** ((t - self._t0) / self.half_life_s))
