"""The input contract: one interaction event per Kafka record, key = user id, value = JSON.

    {"user_id": "42", "item_id": "1193", "ts": 978300760000, "event_id": "optional"}

Anything else is refused with a one-line reason whose prefix is stable (operators grep dead letters by it).
Parsing runs for every event, so it is one ``json.loads`` plus plain type checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_ID_CHARS = 256
MAX_TS_MS = 7_258_118_400_000  # 2200-01-01: later timestamps are typos (seconds vs microseconds), not events


@dataclass(frozen=True, slots=True)
class Event:
    user_id: str
    item_id: str
    ts: int  # epoch milliseconds
    event_id: str | None


class BadEvent(ValueError):
    """Why an input record goes to the dead-letter topic; ``str(exc)`` is the reason."""


def _id(obj: dict, name: str, required: bool = True) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise BadEvent(f"missing field {name}")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadEvent(f"wrong type for {name}: {type(value).__name__}")
    text = value if isinstance(value, str) else _int_text(value, name)
    if not text or len(text) > MAX_ID_CHARS:
        raise BadEvent(f"invalid {name}: length {len(text)} not in 1..{MAX_ID_CHARS}")
    if not text.isprintable():
        raise BadEvent(f"invalid {name}: control characters")
    return text


def _int_text(value: int, name: str) -> str:
    if abs(value) >= 10**MAX_ID_CHARS:
        raise BadEvent(f"invalid {name}: integer too large")
    return str(value)


def _ts(obj: dict, kafka_ts_ms: int | None) -> int:
    value = obj.get("ts")
    if value is None:
        value = kafka_ts_ms
        if value is None:
            raise BadEvent("missing field ts")
    elif isinstance(value, bool) or not isinstance(value, int):
        raise BadEvent(f"wrong type for ts: {type(value).__name__}")
    if not 0 <= value <= MAX_TS_MS:
        raise BadEvent(f"ts out of range: {str(value)[:32]}")
    return value


def parse_event(value: bytes | None, key: bytes | None, kafka_ts_ms: int | None,
                max_value_bytes: int = 65536) -> Event:
    if not value:
        raise BadEvent("empty value")
    if len(value) > max_value_bytes:
        raise BadEvent(f"oversized value: {len(value)} bytes > {max_value_bytes}")
    try:
        obj = json.loads(value)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadEvent(f"malformed JSON: {str(exc)[:80]}") from None
    if not isinstance(obj, dict):
        raise BadEvent(f"not a JSON object: {type(obj).__name__}")
    user = _id(obj, "user_id")
    item = _id(obj, "item_id")
    assert user is not None and item is not None
    if key is not None and key.decode("utf-8", "replace") != user:
        raise BadEvent("key does not match user_id")
    return Event(user, item, _ts(obj, kafka_ts_ms), _id(obj, "event_id", required=False))


def encode_event(user_id: str | int, item_id: str | int, ts: int, event_id: str | None = None) -> tuple[bytes, bytes]:
    """(key, value) as producers must send them."""
    body: dict = {"user_id": str(user_id), "item_id": str(item_id), "ts": int(ts)}
    if event_id is not None:
        body["event_id"] = event_id
    return str(user_id).encode(), json.dumps(body, separators=(",", ":")).encode()
