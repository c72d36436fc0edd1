"""The served versions' live hit rate, and the automatic rollback of a version that serves worse than its parent.

Every training example carries, per version that served the user's recommendation before one of its new
events, how many of those events were scored and how many were hits (stream/examples.py). :class:`LiveWatch`
adds them up per version, in arrival order, and judges each version the online trainer published against its
parent (the version it was fine-tuned from, which served before it):

* The parent's figure is its last ``n`` scored events, the new version's its first ``n``: the two stretches of
  the stream on either side of the swap. ``n`` is sized from the parent's own hit rate ``p`` so that a drop to
  ``p * (1 - online.detectable_drop)`` is seen with probability ``online.power`` at ``online.confidence``
  (two proportions, equal sizes): a sparse stream waits for more events than a dense one. At least
  ``online.min_holdout``, at most the events kept per version (:data:`KEPT_EVENTS`).
* The new version is rolled back when the interval of its hit rate minus its parent's lies below zero (a
  normal-approximation interval at ``online.confidence``, with the variance of each rate taken over users, not
  events: one user's burst of events hits or misses together) and its rate is lower by more
  than ``online.tolerance`` of its parent's: the gate's margin, on live events.
* Each version is judged once. A pinned serving version is an operator's choice and never rolled back, nor is a
  version that did not come from an online round. ``online.rollback=false`` turns the watch off.

The figures of the two sides come from different events, so a stream whose hit rate drifts within ``2n``
events shifts them; the margin and the confidence keep a drift that small from rolling a version back.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from lrustream.kernel.config import OnlineConfig
from trainer.gate import z_interval, z_sum

KEPT_EVENTS = 200_000  # scored events kept per version (its first ones and its last ones)
# versions whose tallies are kept, the most recently scored: the serving one, its parent and stragglers. A
# version's chunks (one per training example) take up to a few tens of MB at KEPT_EVENTS on each side.
KEPT_VERSIONS = 4
Chunk = tuple[str, int, int]  # (user, events, hits) of one training example


@dataclass
class Tally:
    """One version's live scores as (user, events, hits) chunks in arrival order: the first chunks up to
    :data:`KEPT_EVENTS` events, and the last ones up to as many."""

    head: list[Chunk] = field(default_factory=list)
    head_events: int = 0
    tail: deque[Chunk] = field(default_factory=deque)
    tail_events: int = 0
    events: int = 0
    hits: int = 0

    def add(self, user: str, events: int, hits: int) -> None:
        self.events += events
        self.hits += hits
        if self.head_events < KEPT_EVENTS:
            self.head.append((user, events, hits))
            self.head_events += events
        self.tail.append((user, events, hits))
        self.tail_events += events
        while self.tail_events - self.tail[0][1] >= KEPT_EVENTS:
            self.tail_events -= self.tail.popleft()[1]

    def first(self, n: int) -> list[Chunk]:
        """The chunks that make up its first ``n`` events (a chunk is never split)."""
        return _until(self.head, n)

    def last(self, n: int) -> list[Chunk]:
        """The chunks that make up its last ``n`` events."""
        return _until(reversed(self.tail), n)


def _until(chunks, n: int) -> list[Chunk]:  # type: ignore[no-untyped-def]
    out, events = [], 0
    for chunk in chunks:
        if events >= n:
            break
        out.append(chunk)
        events += chunk[1]
    return out


def rate_and_variance(chunks: list[Chunk]) -> tuple[int, float, float]:
    """(events, hit rate, variance of that rate) over ``chunks`` of (user, events, hits). One user's events hit or
    miss together more often than independent events would (a burst of one user's ratings; a user the model
    knows well), and which users are active changes from one stretch of the stream to the next, so the variance
    is the one of a ratio over independent users, not over independent events."""
    per_user: dict[str, list[int]] = {}
    for user, events, hits in chunks:
        counts = per_user.setdefault(user, [0, 0])
        counts[0] += events
        counts[1] += hits
    e, h = np.array(list(per_user.values()), dtype=float).reshape(-1, 2).T
    total = float(e.sum())
    rate = float(h.sum()) / total
    if len(per_user) < 2:
        return int(total), rate, rate * (1 - rate) / total
    residual = h - rate * e
    return int(total), rate, float((residual**2).sum()) / total**2 * len(per_user) / (len(per_user) - 1)


@dataclass
class Judgement:
    """A version judged on live events against its parent."""

    version: str
    parent: str
    events: int  # the version's events judged (its first ones)
    hit_rate: float
    parent_events: int  # the parent's events judged (its last ones)
    parent_hit_rate: float
    diff_low: float
    diff_high: float
    roll_back: bool

    def line(self) -> str:
        verdict = "serves worse than" if self.roll_back else "serves no worse than"
        return (f"{self.version} {verdict} {self.parent} live: HR@K {self.hit_rate:.4f} on its first {self.events} "
                f"events vs {self.parent_hit_rate:.4f} on the parent's last {self.parent_events}, difference "
                f"interval [{self.diff_low:+.4f}, {self.diff_high:+.4f}]")

    def record(self) -> dict[str, object]:
        return {"version": self.version, "parent": self.parent, "events": self.events, "hit_rate": self.hit_rate,
                "parent_events": self.parent_events, "parent_hit_rate": self.parent_hit_rate,
                "diff_low": self.diff_low, "diff_high": self.diff_high, "rolled_back": self.roll_back}


def events_needed(parent_rate: float, o: OnlineConfig) -> int:
    """Scored events per side that see a drop from ``parent_rate`` by ``o.detectable_drop`` (relative) with
    probability ``o.power`` at ``o.confidence``; within [o.min_holdout, KEPT_EVENTS]."""
    p, q = parent_rate, parent_rate * (1 - o.detectable_drop)
    if p <= 0 or p == q:
        return KEPT_EVENTS
    n = math.ceil(z_sum(o) ** 2 * (p * (1 - p) + q * (1 - q)) / (p - q) ** 2)
    return min(KEPT_EVENTS, max(o.min_holdout, n))


class LiveWatch:
    """Live (events, hits) per version, and the judgement of a version against its parent (module docstring)."""

    def __init__(self, o: OnlineConfig) -> None:
        self.o = o
        self.tallies: dict[str, Tally] = {}
        self.judged: dict[str, Judgement] = {}

    def add(self, user: str, live: dict[str, tuple[int, int]]) -> None:
        """One training example's live scores (``user``'s)."""
        for version, (events, hits) in live.items():
            tally = self.tallies.pop(version, None) or Tally()
            tally.add(user, events, hits)
            self.tallies[version] = tally  # most recently scored last
        while len(self.tallies) > KEPT_VERSIONS:
            self.tallies.pop(next(iter(self.tallies)))

    def judge(self, version: str, parent: str) -> Judgement | None:
        """``version`` against ``parent`` once both have enough scored events (None before, and after the version
        was judged once)."""
        if not self.o.rollback or version in self.judged:
            return None
        child, before = self.tallies.get(version), self.tallies.get(parent)
        if child is None or before is None or not before.events:
            return None
        n = events_needed(before.hits / before.events, self.o)
        if child.events < n or before.events < n:
            return None
        ne, q, var_q = rate_and_variance(child.first(n))
        np_, p, var_p = rate_and_variance(before.last(n))
        z = z_interval(self.o)
        se = math.sqrt(var_q + var_p)
        low, high = q - p - z * se, q - p + z * se
        worse = high < 0 and q - p < -self.o.tolerance * p
        verdict = Judgement(version, parent, ne, q, np_, p, low, high, worse)
        self.judged[version] = verdict
        return verdict
