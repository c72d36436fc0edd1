"""Approximate top-K for large catalogues: an inverted-file index over a version's item table.

A recommendation is the ``k`` items of highest score ``h·e_i + b_i`` (the top-layer output ``h`` against item
``i``'s embedding and bias, models/base.py ``score``), minus the items a row excludes. Scoring every item is one
matrix product whose cost grows with the catalogue; above ``stream.approximate_above_items`` items a worker
instead asks an index for candidates and scores only those.

How the index works. Writing the bias as one more coordinate (items ``[e_i, b_i]``, queries ``[h, 1]``) makes
the score a plain inner product. The items are split into ``nlist`` clusters by k-means (FAISS's IVF index,
about ``sqrt(N)`` clusters, trained on a sample); a query ranks the cluster centroids and scans the items of
the ``nprobe`` best clusters only. More clusters scanned is more recall and more time.

How much to scan, and whether to use the index at all, is measured, not configured. When the index is built
(by each worker, beside serving, once it has swapped to a version: nothing about it travels through the topic),
the model's own outputs for sampled item windows (drawn by popularity when the version carries its popularity
note, else uniformly) are ranked exactly and through the index; ``nprobe`` is (to within 25 %) the smallest
whose recall@k over those queries reaches ``stream.approximate_recall``. The recall reached is kept
(``recall``) and shown in the worker's metrics. Both ways are then timed on calls of 16 and 128 rows: the index
serves the call sizes it was faster for (``max_rows``), and a version whose index is never faster is ranked
exactly (stream/serving.py drops the index).

The contract of :meth:`ItemIndex.top`, which serving relies on:

* **Exclusions are exact.** The index is asked for more candidates than ``k`` (``k`` plus the row's excluded
  items, up to a cap); every candidate that is in the row's window, masked (blocked, a request's ``exclude``),
  the padding or the unknown-item row is dropped before ranking. No excluded item is ever returned.
* **Scores are exact.** A candidate's score is its inner product with the query, computed in full (IVF-Flat
  stores the vectors, not codes): the model's score up to float rounding, whichever way it was found.
* **Never too few.** A row left with fewer than ``k`` candidates (many exclusions, a sparse cluster) is scored
  exactly over the whole catalogue, so it gets what the exact path gives.
* **Row by row.** A row's answer depends on its own query only, not on which rows share the call. (Which path
  a call takes does depend on its size when ``max_rows`` is finite: an index that serves small calls only ranks
  a request through the index and a large micro-batch exactly.)
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from models.base import SeqRecModel

log = logging.getLogger("lrustream.worker")
Popularity = tuple[np.ndarray, np.ndarray]  # (internal ids, counts)

CALIBRATION_QUERIES = 256
"""Sampled windows whose exact and approximate top-k fix ``nprobe`` (2,560 top-10 slots: recall to within about
half a percent)."""
TRAIN_POINTS_PER_CLUSTER = 40
"""k-means sample per cluster (FAISS warns below 39): the rest of the items are only assigned."""
KMEANS_ITERATIONS = 10
"""Lloyd iterations of the clustering: later ones barely move the centroids of a sample this size, and each
costs as much as assigning the sample once more."""
NPROBE_STEP = 1.25
"""The calibration's resolution: the nprobe it settles on is within this factor of the smallest that reaches the
recall asked for."""
ANY_ROWS = 1 << 30
"""``max_rows`` of an index that serves calls of every size."""
TIMED_ROWS = (16, 128)
"""Rows per timed call when the index is built: a micro-batch at a steady rate, and one of a backlog."""
MAX_FETCH = 1024
"""Most candidates asked of the index per row; a row whose exclusions leave fewer than ``k`` is scored exactly."""


@dataclass(frozen=True)
class IndexSettings:
    """What a worker's configuration says about approximate top-K (``stream.*`` keys)."""

    above_items: int
    """Catalogues of more items than this are served from the index; smaller ones are scored exactly."""
    recall: float
    """The recall@k the index must reach on the calibration queries (module docstring)."""
    k: int = 10
    """The k whose recall is calibrated (``stream.top_k``)."""

    def wants_index(self, num_items: int) -> bool:
        return self.above_items >= 0 and num_items > self.above_items


class ItemIndex:
    """An IVF index over items 1..N of one model version (module docstring); read-only once built."""

    def __init__(self, index: object, num_items: int) -> None:
        self._index = index
        self.num_items = num_items
        self.nlist = int(index.nlist)  # type: ignore[attr-defined]
        self.nprobe = 1
        self.recall = float("nan")
        """recall@k on the calibration windows at ``nprobe``."""
        self.build_seconds = 0.0
        self.max_rows = ANY_ROWS
        """Calls of up to this many rows go through the index, larger ones are ranked exactly (a product with
        many rows uses the cores better than as many searches): measured when built, :func:`_rows_it_pays_for`."""

    def set_nprobe(self, nprobe: int) -> None:
        self.nprobe = nprobe
        self._index.nprobe = nprobe  # type: ignore[attr-defined]

    @classmethod
    def build(cls, model: SeqRecModel, settings: IndexSettings, popular: Popularity | None = None) -> ItemIndex:
        """Cluster the item table, then pick ``nprobe`` by measured recall. ``popular``: (internal ids, counts)
        to draw calibration windows from in proportion; None: uniformly over the catalogue."""
        import faiss

        t0 = time.monotonic()
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # this thread's: serving's own thread searches with its own
        items = _item_vectors(model)
        n, dim = items.shape
        nlist = max(1, min(n // TRAIN_POINTS_PER_CLUSTER, int(math.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = KMEANS_ITERATIONS
        rng = np.random.default_rng(0)
        train = nlist * TRAIN_POINTS_PER_CLUSTER
        index.train(items if n <= train else items[rng.choice(n, train, replace=False)])
        index.add(items)  # FAISS ids 0..N-1 are internal ids 1..N
        out = cls(index, model.num_items)
        windows = _calibration_windows(model, popular, rng)
        with torch.inference_mode():
            h = model.last_hidden(windows).float()
        nprobe, out.recall = _calibrate(out, model, h, windows, settings)
        out.set_nprobe(nprobe)
        out.max_rows = _rows_it_pays_for(out, model, h, windows, settings.k)
        out.build_seconds = time.monotonic() - t0
        log.info("approximate top-%d index over %d items: %d clusters, %d scanned per query, recall@%d %.4f on %d "
                 "sampled windows, faster than exact ranking for %s (built in %.1f s)", settings.k, n, nlist, nprobe,
                 settings.k, out.recall, CALIBRATION_QUERIES,
                 "no call" if not out.max_rows else "every call" if out.max_rows == ANY_ROWS
                 else f"calls of up to {out.max_rows} rows", out.build_seconds)
        return out

    def used_for(self, rows: int) -> bool:
        """Whether a call ranking ``rows`` rows goes through the index (else it is ranked exactly)."""
        return rows <= self.max_rows

    def candidates(self, h: torch.Tensor, fetch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's ``fetch`` best candidates by the index, best first: ([n, fetch] scores, [n, fetch] internal
        ids; -inf and 0 where it found none). IVF-Flat scores are the items' inner products with the query, not
        estimates; searched with as many threads as torch has (a worker's ``stream.torch_threads``)."""
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        scores, found = self._index.search(_query_vectors(h), fetch)  # type: ignore[attr-defined]
        ids = torch.from_numpy(found + 1)  # FAISS's -1 (nothing found) becomes 0, the padding id
        return torch.from_numpy(scores).masked_fill_(ids == 0, float("-inf")), ids

    @torch.no_grad()
    def top(self, model: SeqRecModel, h: torch.Tensor, windows: torch.Tensor | None, k: int,
            masked: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row of ``h`` [n, d]: the ``k`` best (score, internal id) among the index's candidates that no
        exclusion removes, best first, and a [n] bool telling which rows had fewer than ``k`` such candidates
        (their rows of the first two are to be replaced by exact scoring)."""
        excluded_per_row = int((windows > 0).sum(1).max()) if windows is not None and len(windows) else 0
        n_masked = 0 if masked is None else len(masked)
        fetch = min(self.num_items, MAX_FETCH, k + excluded_per_row + n_masked)
        scores, cand = self.candidates(h, fetch)
        dropped = cand == 0
        if windows is not None and windows.shape[1]:
            dropped |= _in_rows(cand, windows)
        if masked is not None and len(masked):
            dropped |= torch.isin(cand, masked)
        scores[dropped] = float("-inf")
        top_scores, at = torch.topk(scores, min(k, fetch), dim=1)
        short = (~dropped).sum(1) < min(k, self.num_items)
        return top_scores, cand.gather(1, at), short


def _in_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[n, f] bool: whether each of ``values[i]`` is one of ``rows[i]`` (a sorted search, not an [n, f, L] table)."""
    ordered = rows.sort(dim=1).values
    at = torch.searchsorted(ordered, values).clamp_(max=ordered.shape[1] - 1)
    return ordered.gather(1, at) == values


def _item_vectors(model: SeqRecModel) -> np.ndarray:
    """[N, d+1] float32: items 1..N as ``[e_i, b_i]`` (padding and the unknown-item row are not indexed)."""
    emb, bias = model.item_table()
    rows = emb[1: model.num_items + 1].detach().float()
    b = bias[1: model.num_items + 1].detach().float() if bias is not None else rows.new_zeros(rows.shape[0])
    return np.ascontiguousarray(torch.cat([rows, b[:, None]], dim=1).numpy())


def _query_vectors(h: torch.Tensor) -> np.ndarray:
    """[n, d+1] float32: ``[h, 1]``, so that an inner product with an item vector is the item's score."""
    h = h.detach().float()
    return np.ascontiguousarray(torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1).numpy())


def _calibration_windows(model: SeqRecModel, popular: Popularity | None, rng: np.random.Generator) -> torch.Tensor:
    """[Q, max_len] left-padded item windows of lengths spread from 1 to ``model.max_len``: stand-ins for users'
    histories, drawn in proportion to ``popular`` counts when given, else uniformly."""
    n, length = CALIBRATION_QUERIES, model.max_len
    if popular is not None and len(popular[0]) and popular[1].sum() > 0:
        ids = rng.choice(popular[0], size=(n, length), p=popular[1] / popular[1].sum())
    else:
        ids = rng.integers(1, model.num_items + 1, size=(n, length))
    keep = rng.integers(1, length + 1, size=n)
    ids[np.arange(length)[None, :] < (length - keep)[:, None]] = 0
    return torch.from_numpy(ids.astype(np.int64))


def exact_top_ids(model: SeqRecModel, h: torch.Tensor, windows: torch.Tensor | None, k: int,
                  chunk: int = 64) -> torch.Tensor:
    """[n, k] internal ids of each row's ``k`` best items over the whole catalogue, its window excluded (``chunk``
    rows at a time: memory stays bounded whatever the catalogue)."""
    out = []
    for s in range(0, h.shape[0], chunk):
        scores = model.score(h[s: s + chunk])
        if windows is not None:
            scores.scatter_(1, windows[s: s + chunk], float("-inf"))
        out.append(torch.topk(scores, k, dim=1).indices)
    return torch.cat(out)


def recall_at(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean share of each row of ``truth`` [n, k] present in the same row of ``found`` [n, >=k]."""
    k = truth.shape[1]
    hits = (truth[:, :, None] == found[:, None, :]).any(-1).sum(1)
    return float(hits.float().mean() / k)


def _calibrate(index: ItemIndex, model: SeqRecModel, h: torch.Tensor, windows: torch.Tensor,
               settings: IndexSettings) -> tuple[int, float]:
    """The smallest ``nprobe`` (to within :data:`NPROBE_STEP`) whose recall@k, over the calibration windows
    ranked as serving ranks them (windows excluded, short rows scored exactly), reaches ``settings.recall``:
    doubling until it does (all clusters at worst), then halving the gap between the last that did not and the
    first that did."""
    k = min(settings.k, model.num_items)
    with torch.inference_mode():
        truth = exact_top_ids(model, h, windows, k)

    def recall_with(nprobe: int) -> float:
        index.set_nprobe(nprobe)
        _, found, short = index.top(model, h, windows, k, None)
        found[short] = truth[short]  # serving ranks those rows exactly
        return recall_at(found, truth)

    low, high = 0, 1  # low: the largest nprobe tried that fell short (0: none)
    reached = recall_with(high)
    while reached < settings.recall and high < index.nlist:
        low, high = high, min(index.nlist, high * 2)
        reached = recall_with(high)
    while high > max(low + 1, low * NPROBE_STEP):
        middle = (low + high) // 2
        if (got := recall_with(middle)) >= settings.recall:
            high, reached = middle, got
        else:
            low = middle
    return high, reached


def _rows_it_pays_for(index: ItemIndex, model: SeqRecModel, h: torch.Tensor, windows: torch.Tensor, k: int) -> int:
    """Up to how many rows a call is faster through the index than exactly, timed on the calibration windows in
    calls of each of :data:`TIMED_ROWS` rows (best of two each, with the threads serving has):
    :data:`ANY_ROWS` when the index wins at both sizes, the smaller size's geometric mean with the larger when it
    wins at the smaller only, 0 when it never wins (the version is then ranked exactly throughout)."""
    wins = []
    for rows in TIMED_ROWS:
        hs, ws = h[:rows], windows[:rows]
        index_s = [_seconds(index.top, model, hs, ws, k, None) for _ in range(2)]
        exact_s = [_seconds(exact_top_ids, model, hs, ws, k, len(hs)) for _ in range(2)]
        wins.append(min(index_s) < min(exact_s))
    if all(wins):
        return ANY_ROWS
    return int(math.sqrt(TIMED_ROWS[0] * TIMED_ROWS[1])) if wins[0] else 0


def _seconds(call: Callable[..., object], *args: object) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        call(*args)
    return time.perf_counter() - t0
