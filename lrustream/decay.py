"""Where a frozen model's decay over a replay comes from: ``lrustream evaluate-stream``'s ``decay`` section.

A model that never changes can lose hit rate over a replay for reasons no training fixes (the events get harder)
and for reasons training does fix (the model gets stale). This module splits the frozen run's HR@10 by eighth of
the replay into what each eighth's events are made of, from the events alone:

* ``new_item``: the share of events whose item is absent from the warm half (the starting model's catalogue): the
  frozen model can never recommend it, a model trained since can;
* ``new_user``: the share of events from users with no warm event;
* ``history``: the median number of earlier events of the event's user (warm and replayed), the length of the
  history the recurrent state summarises;
* ``hr10_known``: HR@10 on the events whose item and user the warm half holds;
* ``hr10_first_mix``: HR@10 re-weighted to the first eighth's mix of strata (item new or not x history length in
  :data:`HISTORY_BINS`; a stratum an eighth lacks is left out and the others' weights scaled up, none given when
  the strata left hold under half of the first eighth's events): where it stays near the first eighth's HR@10
  while the plain figure falls, the decay is a change of mix (harder events); where it falls too, the model is
  going stale within each kind of event;
* ``pop_warm`` / ``pop_recent``: HR@10 of two popularity recommenders, the ten most frequent items of the warm half
  and those of the eighth before (the warm half's last eighth-length for the first), each skipping what the user
  has already seen. ``pop_recent`` overtaking ``pop_warm`` measures a shift in what is popular.

All of it is a diagnosis printed next to the results, computed after the replay: nothing here feeds back into
training or serving.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

HISTORY_BINS = (10, 50, 200)  # history-length strata: <10, 10-49, 50-199, >=200 earlier events
K = 10
EIGHTHS = 8

Pair = tuple[str, str]  # (user, item)


def _bin(length: int) -> int:
    return int(np.searchsorted(HISTORY_BINS, length, side="right"))


def _popular_hit(ranked: list[str], seen: set[str], item: str) -> float:
    """Whether ``item`` is among the first K of ``ranked`` not in ``seen``."""
    shown = 0
    for candidate in ranked:
        if candidate in seen:
            continue
        if candidate == item:
            return 1.0
        shown += 1
        if shown == K:
            break
    return 0.0


def _standardised(hits: np.ndarray, strata: np.ndarray, weights: dict[int, float]) -> float | None:
    """HR@10 with each stratum weighted as in ``weights``, over the strata that have events here (their weights
    scaled to sum to 1); None when those strata hold less than half of ``weights``: the figure would then speak
    for a different mix."""
    present = {stratum: weight for stratum, weight in weights.items() if (strata == stratum).any()}
    covered = sum(present.values())
    if covered < 0.5:
        return None
    return sum(weight * float(hits[strata == stratum].mean()) for stratum, weight in present.items()) / covered


def _ranked(counts: Counter[str]) -> list[str]:
    """Every item of ``counts``, most frequent first: deep enough to skip a long history."""
    return [item for item, _ in counts.most_common()]


def decompose(warm: Sequence[Pair], scored: Sequence[Pair], hits: Sequence[float]) -> dict[str, list]:
    """The decay table for ``scored`` (the frozen run's scored events, ``(user, item)`` in stream order, each user's
    events in their order) and their ``hits`` (1.0 or 0.0), after ``warm`` (the warm half, in order): for each key
    of the module doc, one value per eighth of ``scored`` (None where an eighth has no such event)."""
    if len(scored) != len(hits):
        raise ValueError(f"{len(scored)} scored events but {len(hits)} hits")
    warm_items = Counter(item for _, item in warm)
    warm_users = {user for user, _ in warm}
    seen: dict[str, set[str]] = {}
    length: Counter[str] = Counter()
    for user, item in warm:
        seen.setdefault(user, set()).add(item)
        length[user] += 1
    chunks = np.array_split(np.arange(len(scored)), EIGHTHS)
    size = max(1, len(chunks[0]))
    recent = Counter(item for _, item in warm[-size:])
    pop_warm = _ranked(warm_items)
    rows: dict[str, list] = {key: [] for key in ("hr10", "new_item", "new_user", "history", "hr10_known",
                                                  "hr10_first_mix", "pop_warm", "pop_recent")}
    first_mix: dict[int, float] | None = None
    hit_array = np.asarray(hits, dtype=float)
    for chunk in chunks:
        pop_recent = _ranked(recent)
        new_item, new_user, history, strata, p_warm, p_recent = [], [], [], [], [], []
        for index in chunk:
            user, item = scored[index]
            mine = seen.setdefault(user, set())
            new_item.append(item not in warm_items)
            new_user.append(user not in warm_users)
            history.append(length[user])
            strata.append(2 * _bin(length[user]) + new_item[-1])
            p_warm.append(_popular_hit(pop_warm, mine, item))
            p_recent.append(_popular_hit(pop_recent, mine, item))
            mine.add(item)
            length[user] += 1
        recent = Counter(scored[i][1] for i in chunk)
        row_hits, is_new_item, is_new_user = hit_array[chunk], np.array(new_item), np.array(new_user)
        stratum_of = np.array(strata)
        if first_mix is None and len(chunk):
            first_mix = {int(s): float(np.mean(stratum_of == s)) for s in np.unique(stratum_of)}
        known = ~is_new_item & ~is_new_user
        rows["hr10"].append(_mean(row_hits))
        rows["new_item"].append(_mean(is_new_item))
        rows["new_user"].append(_mean(is_new_user))
        rows["history"].append(float(np.median(history)) if history else None)
        rows["hr10_known"].append(_mean(row_hits[known]))
        rows["hr10_first_mix"].append(None if first_mix is None or not len(chunk)
                                      else _round(_standardised(row_hits, stratum_of, first_mix)))
        rows["pop_warm"].append(_mean(np.array(p_warm)))
        rows["pop_recent"].append(_mean(np.array(p_recent)))
    return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _mean(values: np.ndarray) -> float | None:
    return round(float(np.mean(values)), 4) if np.size(values) else None


LABELS = {"hr10": "HR@10", "new_item": "item new since the start", "new_user": "user new since the start",
          "history": "median earlier events of the user", "hr10_known": "HR@10, item and user known",
          "hr10_first_mix": "HR@10 at the first eighth's mix", "pop_warm": "HR@10 of the warm top items",
          "pop_recent": "HR@10 of the previous eighth's top items"}


def decay_lines(rows: dict[str, list], indent: str = "") -> list[str]:
    """The decay table as aligned lines, one per key, eighths left to right."""
    def cell(value: float | None, key: str) -> str:
        if value is None:
            return "    -"
        return f"{value:5.0f}" if key == "history" else f"{value:5.3f}"

    width = max(len(label) for label in LABELS.values())
    return [f"{indent}{LABELS[key]:<{width}} " + " ".join(cell(v, key) for v in values)
            for key, values in rows.items()]
