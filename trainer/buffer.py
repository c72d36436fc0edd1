"""What the online trainer knows of the stream: recently active users' windows, a reservoir, the event log.

Each training example (a user's window after the worker served it, the last ``new`` items new) updates the
user's latest window; every new item is an event, numbered ``0, 1, ...`` in arrival order in a log of the
latest ``log_size`` events. Users are kept least recently active first: past ``recent_users`` the oldest is
evicted into a uniform reservoir of ``reservoir_users`` windows (replayed so the model does not forget).
Events numbered below ``trained`` are in the serving model's training data; the others are *new*.

``holdout`` picks the most recent new events that can be judged (each with the user's items before it), and
``training_windows`` cuts every user's window before its first held-out event, so training never sees a
held-out target nor anything after it.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass
class UserWindow:
    items: list[str]  # the user's latest items (external ids, oldest first), at most max_len
    total: int  # events of this user seen so far: items[-1] is the user's event number total - 1


@dataclass(frozen=True)
class HeldEvent:
    user: str
    prefix: list[str]  # the user's items before the event
    target: str


class EventBuffer:
    """Recently active users' windows (least recently active evicted first, into a uniform reservoir of
    windows) and the log of the latest ``log_size`` events in arrival order, each numbered ``0, 1, ...``."""

    def __init__(self, recent_users: int, reservoir_users: int, max_len: int, log_size: int = 200_000,
                 seed: int = 0) -> None:
        self.users: OrderedDict[str, UserWindow] = OrderedDict()
        self.reservoir: list[list[str]] = []
        self.log: deque[tuple[int, str, int]] = deque(maxlen=log_size)  # (number, user, user's event number)
        self.recent_cap, self.reservoir_cap, self.max_len = recent_users, reservoir_users, max_len
        self.seen = 0  # events added so far: the next event's number
        self.trained = 0  # events numbered below this are in the serving model's training data
        self.evicted = 0
        self.rng = random.Random(seed)

    def add(self, user: str, items: list[str], new: int) -> None:
        """A training example: ``user``'s window after the worker served it, the last ``new`` items new."""
        new = max(0, new)  # may exceed the window: a micro-batch with more events of the user than max_len
        known = self.users.pop(user, None)
        total = (known.total if known else len(items) - min(new, len(items))) + new
        self.users[user] = UserWindow(items[-self.max_len:], total)
        for j in range(new):
            self.log.append((self.seen, user, total - new + j))
            self.seen += 1
        while len(self.users) > self.recent_cap:
            _, old = self.users.popitem(last=False)
            self._keep(old.items)

    def _keep(self, window: list[str]) -> None:
        self.evicted += 1
        if len(self.reservoir) < self.reservoir_cap:
            self.reservoir.append(window)
        elif (j := self.rng.randrange(self.evicted)) < self.reservoir_cap:
            self.reservoir[j] = window

    @property
    def new_events(self) -> int:
        return self.seen - self.trained

    def __len__(self) -> int:
        return len(self.users) + len(self.reservoir)

    def _position(self, user: str, event: int) -> int | None:
        """Index of a user's event in its current window (None when evicted or out of the window)."""
        w = self.users.get(user)
        if w is None:
            return None
        pos = event - (w.total - len(w.items))
        return pos if 0 <= pos < len(w.items) else None

    def holdout(self, n: int, after: int = 0) -> tuple[list[HeldEvent], int]:
        """The last ``n`` new events numbered ``after`` or later that can be judged (a prefix in the window), and
        the number of the first of them: training data ends there."""
        picked: list[tuple[int, HeldEvent]] = []
        for number, user, event in reversed(self.log):
            if number < max(self.trained, after) or len(picked) >= n:
                break
            pos = self._position(user, event)
            if pos:  # pos 0 has no prefix to judge from
                items = self.users[user].items
                picked.append((number, HeldEvent(user, items[:pos], items[pos])))
        picked.reverse()
        return [h for _, h in picked], (picked[0][0] if picked else self.seen)

    def training_windows(self, until: int) -> tuple[list[list[str]], list[list[str]]]:
        """(windows of users with new events before event number ``until``, windows of every other user),
        each cut before the user's first event numbered ``until`` or later."""
        first_held: dict[str, int] = {}
        fresh: set[str] = set()
        for number, user, event in self.log:
            if number >= until:
                first_held.setdefault(user, event)
            elif number >= self.trained:
                fresh.add(user)
        with_new, others = [], []
        for user, w in self.users.items():
            items = w.items
            if user in first_held:
                cut = self._position(user, first_held[user])
                items = items[:cut] if cut is not None else items
            if len(items) >= 2:
                (with_new if user in fresh else others).append(items)
        others += [w for w in self.reservoir if len(w) >= 2]
        return with_new, others
