"""Data sets as per-user chronological sequences, read from the formats in ../shared/data.

Supported (``load_sequences`` detects them from a file or a folder):

* LRURec ``sequences.txt``: ``user item_1 ... item_n``, the authors' preprocessed split (last = test,
  second-to-last = validation). Taken as is: ids are already dense, no filtering, no timestamps.
* MovieLens ``ratings.dat`` / ``ratings.dat.gz`` (``user::item::rating::ts``) and ``u.data`` (tab separated).
* Amazon ``*_item.txt`` + ``*_time.txt`` (one user per line, items and unix times aligned).

Raw interaction files get the LRURec preprocessing: per user sorted by (time, item), immediate repeats
removed, items with >= 5 interactions then users with >= 5 kept (one pass).
"""

from __future__ import annotations

import gzip
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrustream.kernel.errors import LrustreamError
from models.vocab import Vocabulary


class DataError(LrustreamError, ValueError):
    """The data path is missing or in no format we read (one-line message)."""


@dataclass
class Sequences:
    """Chronological item sequences per user; ``times`` (epoch seconds) when the format has them."""

    users: list[str]
    items: list[list[str]]
    times: list[list[int]] | None
    name: str
    dense_ids: bool = False  # external ids already are 1..N (LRURec files): keep the identity vocabulary

    def __len__(self) -> int:
        return len(self.users)

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.items)

    def vocabulary(self) -> Vocabulary:
        if self.dense_ids:
            return Vocabulary.identity(max(int(i) for seq in self.items for i in seq))
        ordered = sorted({i for seq in self.items for i in seq}, key=lambda s: (len(s), s))
        return Vocabulary(ordered)

    def encoded(self, vocab: Vocabulary) -> list[np.ndarray]:
        """Model ids per user (items unknown to ``vocab`` become the OOV id N + 1)."""
        oov = len(vocab) + 1
        return [np.fromiter((vocab.get(i, oov) for i in seq), dtype=np.int64, count=len(seq)) for seq in self.items]

    def events(self) -> Iterator[tuple[str, str, int]]:
        """(user, item, ts_ms) in global time order (stable: users' own order kept on ties)."""
        if self.times is None:
            raise DataError(f"{self.name} has no timestamps; a time-ordered replay needs a timestamped data set")
        flat = [(t, u_idx, pos) for u_idx, ts in enumerate(self.times) for pos, t in enumerate(ts)]
        flat.sort()
        for t, u_idx, pos in flat:
            yield self.users[u_idx], self.items[u_idx][pos], int(t) * 1000


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("latin-1")


def _lrurec(path: Path) -> Sequences:
    users, items = [], []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            users.append(parts[0])
            items.append(parts[1:])
    return Sequences(users, items, None, path.parent.name, dense_ids=True)


def _triples(path: Path, sep: str) -> list[tuple[str, str, int]]:
    out = []
    for line in _read_text(path).splitlines():
        parts = line.split(sep) if sep != "\t" else line.split()
        if len(parts) >= 4:
            out.append((parts[0].strip(), parts[1].strip(), int(parts[3])))
    return out


def _amazon(item_file: Path, time_file: Path) -> Sequences:
    users, items, times = [], [], []
    for li, lt in zip(item_file.read_text().splitlines(), time_file.read_text().splitlines(), strict=True):
        pi, pt = li.split(), lt.split()
        if len(pi) < 2:
            continue
        if pi[0] != pt[0] or len(pi) != len(pt):
            raise DataError(f"{item_file.name} and {time_file.name} disagree for user {pi[0]}")
        users.append(pi[0])
        items.append(pi[1:])
        times.append([int(t) for t in pt[1:]])
    return Sequences(users, items, times, item_file.parent.name)


def preprocess(triples: list[tuple[str, str, int]], name: str, min_count: int = 5) -> Sequences:
    """LRURec's preprocessing of raw (user, item, ts) rows."""
    item_counts = Counter(i for _, i, _ in triples)
    kept = [r for r in triples if item_counts[r[1]] >= min_count]
    user_counts = Counter(u for u, _, _ in kept)
    kept = [r for r in kept if user_counts[r[0]] >= min_count]
    per_user: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for u, i, t in kept:
        per_user[u].append((t, i))
    users, items, times = [], [], []
    for u in sorted(per_user, key=lambda s: (len(s), s)):
        rows = sorted(per_user[u], key=lambda r: (r[0], (len(r[1]), r[1])))
        seq_i, seq_t = [], []
        for t, i in rows:
            if seq_i and seq_i[-1] == i:  # immediate repeat
                continue
            seq_i.append(i)
            seq_t.append(t)
        users.append(u)
        items.append(seq_i)
        times.append(seq_t)
    return Sequences(users, items, times, name)


def load_sequences(path: str | Path, min_count: int = 5) -> Sequences:
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in ("sequences.txt", "ratings.dat", "ratings.dat.gz", "u.data"):
            if (p / candidate).is_file():
                return load_sequences(p / candidate, min_count)
        item_files = sorted(p.glob("*_item.txt"))
        if item_files:
            return load_sequences(item_files[0], min_count)
        raise DataError(f"{p}: no sequences.txt, ratings.dat[.gz], u.data or *_item.txt inside")
    if not p.is_file():
        raise DataError(f"data path not found: {p}")
    name = p.name
    if name == "sequences.txt":
        return _lrurec(p)
    if name.startswith("ratings.dat"):
        return preprocess(_triples(p, "::"), p.parent.name, min_count)
    if name == "u.data":
        return preprocess(_triples(p, "\t"), p.parent.name, min_count)
    if name.endswith("_item.txt"):
        time_file = p.with_name(name.replace("_item.txt", "_time.txt"))
        if not time_file.is_file():
            raise DataError(f"{p}: the matching {time_file.name} is missing")
        return _amazon(p, time_file)
    raise DataError(f"{p}: unknown data format (expected sequences.txt, ratings.dat[.gz], u.data or *_item.txt)")
