"""The input contract: one interaction event per Kafka record, key = user id (UTF-8), value = JSON.

    {"user_id": "42", "item_id": "1193", "ts": 978300760000, "event_id": "optional"}

A record that breaks the contract is refused with :class:`BadEvent`, whose message is one line starting with a
stable prefix (the part before the first ``:``): the worker dead-letters the record with that reason, metrics
count by the prefix, operators grep for it. ``stream/README.md`` lists the prefixes.

Parsing runs for every event, so it is one ``orjson.loads`` (``json.loads`` only for what orjson refuses) plus
plain ``isinstance`` checks and one regex.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

from lrustream.kernel.errors import LrustreamError

MAX_ID_CHARS = 256
MIN_TS_MS = 0
MAX_TS_MS = 7_258_118_400_000  # 2200-01-01T00:00:00Z: later values are unit mistakes (us, ns), not events
_INT_ID_MAX_BITS = 4 * MAX_ID_CHARS  # ints wider than this cannot print in MAX_ID_CHARS digits: skip str()
# C0/C1 control characters and lone surrogates: ids become Kafka keys, state-store keys and log lines, so they
# must print on one line and encode to UTF-8.
_BAD_ID_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Event:
    """One accepted interaction; ids in canonical string form (ints become ``str(int)``)."""

    user_id: str
    item_id: str
    ts: int  # epoch milliseconds
    event_id: str | None


class BadEvent(LrustreamError, ValueError):
    """Why an input record goes to the dead-letter topic; ``str(exc)`` is the reason (one line, stable prefix)."""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_id(value: Any, name: str) -> str:
    """Canonical text of an id (str kept exactly, int as ``str(int)``) or BadEvent saying what is wrong."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > _INT_ID_MAX_BITS:
            raise BadEvent(f"invalid {name}: integer longer than {MAX_ID_CHARS} digits")
        text = str(value)
    else:
        raise BadEvent(f"wrong type for {name}: {_type_name(value)}")
    if not text:
        raise BadEvent(f"invalid {name}: empty")
    if len(text) > MAX_ID_CHARS:
        raise BadEvent(f"invalid {name}: {len(text)} characters > {MAX_ID_CHARS}")
    bad = _BAD_ID_CHAR.search(text)
    if bad is not None:
        raise BadEvent(f"invalid {name}: character U+{ord(bad.group()):04X} at {bad.start()}")
    return text


def _required_id(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if value is None:  # absent and null mean the same: the producer did not say
        raise BadEvent(f"missing field {name}")
    return check_id(value, name)


def _check_ts(value: int) -> int:
    if not MIN_TS_MS <= value <= MAX_TS_MS:
        raise BadEvent(f"ts out of range: {value}" if value.bit_length() < 128 else "ts out of range: huge")
    return value


def _event_ts(obj: dict[str, Any], kafka_ts_ms: int | None) -> int:
    """The event's own time when given, else the record's Kafka timestamp (negative = Kafka's 'none')."""
    value = obj.get("ts")
    if value is None:
        if kafka_ts_ms is None or kafka_ts_ms < 0:
            raise BadEvent("missing field ts")
        return _check_ts(kafka_ts_ms)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadEvent(f"wrong type for ts: {_type_name(value)}")
    return _check_ts(value)


_MISSING = object()
_CHECKED_NUMBERS = ("user_id", "item_id", "event_id", "ts")


def _decode(value: bytes | None, max_value_bytes: int) -> dict[str, Any]:
    """Size first (a huge value must not be decoded at all), then strict UTF-8, then one JSON object."""
    if not value:
        raise BadEvent("empty value")
    if len(value) > max_value_bytes:
        raise BadEvent(f"oversized value: {len(value)} bytes > {max_value_bytes}")
    try:
        obj = orjson.loads(value)  # UTF-8 only, as the contract says; a tenth of json's cost
    except orjson.JSONDecodeError:
        obj = _MISSING
    if isinstance(obj, dict) and any(type(obj.get(name)) is float for name in _CHECKED_NUMBERS):
        obj = _MISSING  # orjson reads an integer beyond 64 bits as a float: json tells the two apart
    try:
        # what orjson refuses, json decides (it alone reads NaN, lone surrogates, ints beyond 64 bits); decode
        # explicitly: json.loads(bytes) would also accept UTF-16/32, which the contract does not
        if obj is _MISSING:
            obj = json.loads(value.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        detail = " ".join(str(exc).split())[:100]
        raise BadEvent(f"malformed JSON: {detail or type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise BadEvent(f"not a JSON object: {_type_name(obj)}")
    return obj


def parse_event(value: bytes | None, key: bytes | None, kafka_ts_ms: int | None,
                max_value_bytes: int = 65536) -> Event:
    """The event a record carries, or :class:`BadEvent`. Never raises anything else, whatever the bytes.

    The key must equal the user id because partitioning, per-user state and ordering all hang on it; a
    record without key is accepted (its partition is then the producer's business)."""
    obj = _decode(value, max_value_bytes)
    user_id = _required_id(obj, "user_id")
    item_id = _required_id(obj, "item_id")
    if key is not None:
        try:
            key_text = key.decode("utf-8")
        except UnicodeDecodeError:
            raise BadEvent("key is not UTF-8") from None
        if key_text != user_id:
            raise BadEvent("key does not match user_id")
    ts = _event_ts(obj, kafka_ts_ms)
    raw_event_id = obj.get("event_id")
    event_id = None if raw_event_id is None else check_id(raw_event_id, "event_id")
    return Event(user_id, item_id, ts, event_id)


def encode_event(user_id: str | int, item_id: str | int, ts: int,
                 event_id: str | int | None = None) -> tuple[bytes, bytes]:
    """(key, value) as producers must send them; refuses (BadEvent) what :func:`parse_event` would refuse,
    so a producer fails at the source instead of filling the dead-letter topic."""
    user = check_id(user_id, "user_id")
    body: dict[str, Any] = {"user_id": user, "item_id": check_id(item_id, "item_id")}
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise BadEvent(f"wrong type for ts: {_type_name(ts)}")
    body["ts"] = _check_ts(ts)
    if event_id is not None:
        body["event_id"] = check_id(event_id, "event_id")
    value = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return user.encode("utf-8"), value
