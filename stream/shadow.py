"""Shadow scoring: a candidate model version predicts every event beside the serving one, off the
output path, so that an operator (or the trainer's gate) can compare the two on live events before promoting.

The measure is prequential: for an event of item ``i`` by a user with an earlier event, each version's top-K
predicted after that earlier event (the user's window then excluded, as the worker recommends) either holds
``i`` (a hit) or not. An event counts only when both versions had a prediction for it, so the two hit rates
are over the same events. For the serving version that top-K is exactly the recommendation the worker emitted
after the earlier event (blocked items aside); the candidate keeps a state of its own per user, in memory,
re-derived from the user's stored window the first time it sees the user, and whenever the user's stored
record is not the one it last followed (a restart, a rebalance, a retried batch).

Nothing of this reaches a recommendation or a stored state: the candidate reads the batch, never writes it. Its
states are bounded (MAX_USERS, least recently seen dropped first) and lost on restart, when they are re-derived.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from models.base import padded_steps
from stream.serving import Serving

MAX_USERS = 200_000  # candidate states kept in memory (each a few KiB for d_model=64)


@dataclass
class _Followed:
    offset: int  # the input offset of the user's last event this state has applied
    state: torch.Tensor  # the candidate's state row (model.state_rows)
    hidden: torch.Tensor | None  # its top-layer output after that event (None: no event yet)


@dataclass
class Tally:
    """Events both versions predicted, and each one's hits, since shadowing began (or the serving version
    changed: the tally is per pair of versions)."""

    serving: str
    shadow: str
    events: int = 0
    serving_hits: int = 0
    shadow_hits: int = 0


class Shadow:
    """A candidate version and its per-user states (module docstring)."""

    def __init__(self, candidate: Serving, max_users: int = MAX_USERS) -> None:
        self.candidate = candidate
        self.max_users = max_users
        self._users: OrderedDict[tuple[int, str], _Followed] = OrderedDict()
        self.tally: Tally | None = None

    @property
    def version(self) -> str:
        return self.candidate.version

    def observe(self, live: Serving, users: list[tuple[int, str]], offsets: list[int], windows: list[list[str]],
                events: list[list[tuple[int, str, int]]], live_prev: list[list[torch.Tensor | None]],
                before: torch.Tensor, k: int, min_rows: int) -> Tally:
        """Count one batch. Per user (in ``users`` order): the offset of its stored record before the batch, its
        stored window (external ids), its events as (``live``'s id or 0 when unknown, external item id, input
        offset) and ``live``'s top-layer output before each event (None: no prediction); ``before`` [E, L]
        holds, event by event in that order, the window before the event as ``live`` ids (0 = nothing)."""
        if self.tally is None or self.tally.serving != live.version:
            self.tally = Tally(live.version, self.version)
        cand_prev = self._advance(users, offsets, windows, events, min_rows)
        rows = [(u, j) for u in range(len(users)) for j in range(len(events[u]))
                if live_prev[u][j] is not None and cand_prev[u][j] is not None]
        if not rows:
            return self.tally
        starts = [0, *itertools.accumulate(len(e) for e in events)]  # each user's first row in ``before``
        masks = before[torch.tensor([starts[u] + j for u, j in rows])]
        live_hits = _hits(live, torch.stack([live_prev[u][j] for u, j in rows]), masks,
                          [events[u][j][0] for u, j in rows], k, min_rows)
        cand_ids = [self.candidate.vocab.get(events[u][j][1]) or 0 for u, j in rows]
        cand_hits = _hits(self.candidate, torch.stack([cand_prev[u][j] for u, j in rows]), masks, cand_ids, k,
                          min_rows)
        self.tally.events += len(rows)
        self.tally.serving_hits += live_hits
        self.tally.shadow_hits += cand_hits
        return self.tally

    def _advance(self, users: list[tuple[int, str]], offsets: list[int], windows: list[list[str]],
                 events: list[list[tuple[int, str, int]]], min_rows: int) -> list[list[torch.Tensor | None]]:
        """Step the candidate through the batch; its top-layer output before each event (None: none yet)."""
        model = self.candidate.model
        stale = [u for u, (user, offset) in enumerate(zip(users, offsets, strict=True))
                 if (f := self._users.get(user)) is None or f.offset != offset]
        if stale:
            self._rederive([users[u] for u in stale], [offsets[u] for u in stale], [windows[u] for u in stale],
                           min_rows)
        followed = [self._users[user] for user in users]
        longest = max(len(e) for e in events)
        items = torch.zeros(len(users), longest, dtype=torch.long)
        for row, evs in enumerate(events):
            items[row, :len(evs)] = self.candidate.internal_ids([item for _, item, _ in evs])
        state, hidden = padded_steps(model, model.state_from_rows(torch.stack([f.state for f in followed])), items,
                                     min_rows)
        rows = model.state_rows(state)
        prev: list[list[torch.Tensor | None]] = []
        for row, (user, f, evs) in enumerate(zip(users, followed, events, strict=True)):
            prev.append([f.hidden, *(hidden[row, j] for j in range(len(evs) - 1))])
            self._users[user] = _Followed(evs[-1][2], rows[row].clone(), hidden[row, len(evs) - 1].clone())
            self._users.move_to_end(user)
        while len(self._users) > self.max_users:
            self._users.popitem(last=False)
        return prev

    def _rederive(self, users: list[tuple[int, str]], offsets: list[int], windows: list[list[str]],
                  min_rows: int) -> None:
        """The candidate's state and output after each user's stored window, from a fresh state."""
        model = self.candidate.model
        items = torch.zeros(len(users), max(1, max(len(w) for w in windows)), dtype=torch.long)
        for row, window in enumerate(windows):
            if window:
                items[row, :len(window)] = self.candidate.internal_ids(window)
        state, hidden = padded_steps(model, model.init_state(len(users)), items, min_rows)
        rows = model.state_rows(state)
        for row, (user, offset, window) in enumerate(zip(users, offsets, windows, strict=True)):
            last = hidden[row, len(window) - 1].clone() if window else None
            self._users[user] = _Followed(offset, rows[row].clone(), last)


def _hits(serving: Serving, h: torch.Tensor, masks: torch.Tensor, targets: list[int], k: int, min_rows: int) -> int:
    """How many rows' ``targets`` (internal ids; 0 = an item the version does not know, never a hit) are in the
    row's top-``k`` with the row's ``masks`` (ids beyond the version's items are ignored) excluded."""
    masks = torch.where(masks <= serving.num_items, masks, 0)
    _, ids = serving.top_ids(h, masks, k, min_rows)
    return sum(t > 0 and t in row for t, row in zip(targets, ids.tolist(), strict=True))
