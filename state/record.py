"""One user's record in the state store, and its compact binary encoding.

A record is everything needed to serve the user's next event without re-reading history:

- ``state``: the model's recurrent state for this user, as bytes (the model decides the layout);
- ``version``: the model version that produced ``state`` (a different serving version re-derives it);
- ``window``: the user's last ``max_len`` item ids, oldest first, as internal vocabulary ids; an item the
  vocabulary did not know when it arrived is stored as ``-(k + 1)`` pointing at ``unknown[k]`` (its external
  id), so that a later, grown vocabulary can map it and re-derive the state with real embeddings;
- ``partition``/``offset``: the last input event applied (``offset`` -1 = none): an event whose offset is not
  newer is never applied again;
- ``updated_ms``: wall-clock time of the last update, for operators and for expiry (the state TTL reads it from
  the header alone: :func:`updated_ms_of`);
- ``hidden``: the model's top-layer output after the last event (float32 bytes), what scoring needs: a request
  for the user's top-K (stream/queries.py) is one product with the item table, without advancing the state.
  Empty in records written before format 2, and after a re-derivation until the next event.

The encoding is a fixed little-endian header plus length-prefixed sections, versioned by its first byte so
that old records stay readable after a format change.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from lrustream.kernel.errors import LrustreamError

FORMAT = 2
_HEADER_V1 = struct.Struct("<BiqqHIH")  # format, partition, offset, updated_ms, len(version), len(state), n_unknown
_HEADER = struct.Struct("<BiqqHIHI")  # format 2 adds len(hidden); hidden follows the state


def updated_ms_of(blob: bytes) -> int:
    """An encoded record's ``updated_ms`` without decoding the rest (at the same place in every format)."""
    return _HEADER_V1.unpack_from(blob)[3]


class RecordError(LrustreamError, ValueError):
    """A stored record cannot be decoded (corruption, or a format this code does not know)."""


@dataclass(slots=True)
class UserRecord:
    state: bytes
    version: str
    window: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))  # int32 [<= max_len]
    unknown: list[str] = field(default_factory=list)
    partition: int = -1
    offset: int = -1
    updated_ms: int = 0
    hidden: bytes = b""

    def external_window(self, item_of: callable) -> list[str]:  # type: ignore[valid-type]
        """The window as external item ids (``item_of`` maps known internal ids)."""
        return [self.unknown[-i - 1] if i < 0 else item_of(int(i)) for i in self.window]

    def encode(self) -> bytes:
        version = self.version.encode()
        unknown = [u.encode() for u in self.unknown]
        window = np.ascontiguousarray(self.window, dtype="<i4")
        parts = [
            _HEADER.pack(FORMAT, self.partition, self.offset, self.updated_ms, len(version), len(self.state),
                         len(unknown), len(self.hidden)),
            version,
            self.state,
            self.hidden,
            struct.pack("<I", len(window)),
            window.tobytes(),
        ]
        for u in unknown:
            parts += [struct.pack("<H", len(u)), u]
        return b"".join(parts)

    @classmethod
    def decode(cls, blob: bytes) -> UserRecord:
        try:
            fmt = blob[0] if blob else -1
            if fmt == 1:
                _, partition, offset, updated, n_ver, n_state, n_unknown = _HEADER_V1.unpack_from(blob, 0)
                n_hidden, pos = 0, _HEADER_V1.size
            elif fmt == FORMAT:
                _, partition, offset, updated, n_ver, n_state, n_unknown, n_hidden = _HEADER.unpack_from(blob, 0)
                pos = _HEADER.size
            else:
                raise RecordError(f"unknown state record format {fmt}")
            version = blob[pos: pos + n_ver].decode()
            pos += n_ver
            state = bytes(blob[pos: pos + n_state])
            pos += n_state
            hidden = bytes(blob[pos: pos + n_hidden])
            pos += n_hidden
            (n_win,) = struct.unpack_from("<I", blob, pos)
            pos += 4
            window = np.frombuffer(blob, dtype="<i4", count=n_win, offset=pos).astype(np.int32)
            pos += 4 * n_win
            unknown = []
            for _ in range(n_unknown):
                (n,) = struct.unpack_from("<H", blob, pos)
                unknown.append(blob[pos + 2: pos + 2 + n].decode())
                pos += 2 + n
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, RecordError):
                raise
            raise RecordError(f"corrupt state record: {exc}") from None
        if pos != len(blob) or len(state) != n_state or len(hidden) != n_hidden:
            raise RecordError("corrupt state record: length mismatch")
        return cls(state, version, window, unknown, partition, offset, updated, hidden)


def push_item(window: np.ndarray, unknown: list[str], item: int | str, max_len: int) -> tuple[np.ndarray, list[str]]:
    """Append one item (an internal id, or an external id the vocabulary lacks) keeping the last ``max_len``."""
    if isinstance(item, str):
        if item in unknown:
            code = -unknown.index(item) - 1
        else:
            unknown = [*unknown, item]
            code = -len(unknown)
    else:
        code = item
    window = np.append(window, np.int32(code))[-max_len:]
    if unknown:  # drop external ids no longer referenced, renumbering the codes that remain
        used = sorted({-int(c) - 1 for c in window if c < 0})
        if len(used) != len(unknown):
            remap = {old: new for new, old in enumerate(used)}
            window = np.array([c if c >= 0 else -remap[-int(c) - 1] - 1 for c in window], dtype=np.int32)
            unknown = [unknown[i] for i in used]
    return window.astype(np.int32), unknown


def push_items(window: np.ndarray, unknown: list[str], items: list[int | str], max_len: int
               ) -> tuple[np.ndarray, list[str]]:
    """:func:`push_item` applied to each of ``items`` in turn. One concatenation when no external id is involved
    (nearly always: a served micro-batch, a state re-derived after a swap); pushing 200 items one by one costs
    about 1 ms, paid by every active user after every model swap."""
    if not unknown and not any(isinstance(x, str) for x in items):
        return np.concatenate([window.astype(np.int32), np.asarray(items, dtype=np.int32)])[-max_len:], []
    for x in items:
        window, unknown = push_item(window, unknown, x, max_len)
    return window, unknown
