"""The input contract (stream/events.py): one unit test per rule, and properties over arbitrary input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.events import MAX_ID_CHARS, MAX_TS_MS, BadEvent, Event, encode_event, parse_event

TS = 978_300_760_000


def value(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def reason(raw: bytes | None, key: bytes | None = None, kafka_ts: int | None = TS, **kw: Any) -> str:
    with pytest.raises(BadEvent) as info:
        parse_event(raw, key, kafka_ts, **kw)
    text = str(info.value)
    assert "\n" not in text
    return text


# ----- good events --------------------------------------------------------------------------------------------
def test_string_ids_are_kept_exactly() -> None:
    raw = value(user_id=" 42 ", item_id="ünï", ts=TS, event_id="e-1")
    assert parse_event(raw, b" 42 ", None) == Event(" 42 ", "ünï", TS, "e-1")


def test_int_ids_become_canonical_strings() -> None:
    raw = value(user_id=42, item_id=-1193, ts=TS, event_id=7)
    assert parse_event(raw, b"42", None) == Event("42", "-1193", TS, "7")


def test_ts_falls_back_to_the_kafka_timestamp_when_absent_or_null() -> None:
    assert parse_event(value(user_id="u", item_id="i"), None, 123).ts == 123
    assert parse_event(value(user_id="u", item_id="i", ts=None), None, 123).ts == 123
    assert parse_event(value(user_id="u", item_id="i", ts=5), None, 123).ts == 5  # the event's own time wins


def test_missing_key_and_null_event_id_are_accepted_and_extra_fields_ignored() -> None:
    ev = parse_event(value(user_id="u", item_id="i", ts=TS, event_id=None, rating=5, meta={"a": [1]}), None, None)
    assert ev == Event("u", "i", TS, None)


def test_limits_are_inclusive() -> None:
    long_id = "x" * MAX_ID_CHARS
    assert parse_event(value(user_id=long_id, item_id=long_id, ts=MAX_TS_MS), None, None).ts == MAX_TS_MS
    assert parse_event(value(user_id="u", item_id="i", ts=0), None, None).ts == 0
    raw = value(user_id="u", item_id="i", ts=TS)
    assert parse_event(raw, None, None, max_value_bytes=len(raw)).user_id == "u"


# ----- each refusal, by its stable prefix -----------------------------------------------------------------------
@pytest.mark.parametrize("raw", [None, b""])
def test_empty_value(raw: bytes | None) -> None:
    assert reason(raw) == "empty value"


def test_size_is_checked_before_decoding() -> None:
    assert reason(b"\xff" * 101, max_value_bytes=100) == "oversized value: 101 bytes > 100"


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", b"{", b"{'user_id': 1}", b"\xef\xbb\xbf{}", b"[" * 100_000,
                                 '{"user_id":"u"}'.encode("utf-16")])
def test_malformed_json(raw: bytes) -> None:
    assert reason(raw, max_value_bytes=1 << 20).startswith("malformed JSON: ")


@pytest.mark.parametrize(("raw", "kind"), [(b"[1]", "list"), (b'"x"', "str"), (b"3", "int"), (b"null", "null"),
                                           (b"true", "bool"), (b"1.5", "float")])
def test_not_an_object(raw: bytes, kind: str) -> None:
    assert reason(raw) == f"not a JSON object: {kind}"


@pytest.mark.parametrize("field", ["user_id", "item_id"])
def test_missing_or_null_ids(field: str) -> None:
    fields: dict[str, Any] = {"user_id": "u", "item_id": "i", "ts": TS}
    del fields[field]
    assert reason(value(**fields)) == f"missing field {field}"
    assert reason(value(**fields, **{field: None})) == f"missing field {field}"


@pytest.mark.parametrize(("bad", "kind"), [(1.0, "float"), (True, "bool"), ([1], "list"), ({"a": 1}, "dict")])
@pytest.mark.parametrize("field", ["user_id", "item_id", "event_id"])
def test_wrong_id_types(field: str, bad: Any, kind: str) -> None:
    fields: dict[str, Any] = {"user_id": "u", "item_id": "i", "ts": TS, field: bad}
    assert reason(value(**fields)) == f"wrong type for {field}: {kind}"


@pytest.mark.parametrize("bad", ["", "x" * (MAX_ID_CHARS + 1), "a\nb", "tab\t", "\x00", "del\x7f", "c1\x85",
                                 "\ud800", 10**MAX_ID_CHARS, -(10**(MAX_ID_CHARS - 1)), 10**1000])
@pytest.mark.parametrize("field", ["user_id", "item_id", "event_id"])
def test_invalid_ids(field: str, bad: Any) -> None:
    fields: dict[str, Any] = {"user_id": "u", "item_id": "i", "ts": TS, field: bad}
    assert reason(value(**fields)).startswith(f"invalid {field}: ")


@pytest.mark.parametrize(("ts", "kind"), [(1.5, "float"), (True, "bool"), ("978300760000", "str"), ([1], "list")])
def test_wrong_ts_type(ts: Any, kind: str) -> None:
    assert reason(value(user_id="u", item_id="i", ts=ts)) == f"wrong type for ts: {kind}"


@pytest.mark.parametrize("ts", [-1, MAX_TS_MS + 1, 10**40])
def test_ts_out_of_range(ts: int) -> None:
    assert reason(value(user_id="u", item_id="i", ts=ts)).startswith("ts out of range: ")
    assert reason(value(user_id="u", item_id="i"), kafka_ts=MAX_TS_MS + 1) == f"ts out of range: {MAX_TS_MS + 1}"


@pytest.mark.parametrize("kafka_ts", [None, -1])  # -1: Kafka's "no timestamp"
def test_missing_ts_without_kafka_timestamp(kafka_ts: int | None) -> None:
    assert reason(value(user_id="u", item_id="i"), kafka_ts=kafka_ts) == "missing field ts"


@pytest.mark.parametrize("key", [b"u2", b"", b" u"])
def test_key_must_match_user_id(key: bytes) -> None:
    assert reason(value(user_id="u", item_id="i", ts=TS), key=key) == "key does not match user_id"


@pytest.mark.parametrize("key", [b"\xff", b"u\xc3", b"\xed\xa0\x80"])  # invalid byte, cut sequence, surrogate
def test_a_key_that_is_not_utf8_says_so(key: bytes) -> None:
    assert reason(value(user_id="u", item_id="i", ts=TS), key=key) == "key is not UTF-8"


def test_key_is_compared_as_utf8_text() -> None:
    assert parse_event(value(user_id="ü", item_id="i", ts=TS), "ü".encode(), None).user_id == "ü"
    assert parse_event(value(user_id=7, item_id="i", ts=TS), b"7", None).user_id == "7"


def test_encode_event_refuses_what_parse_would_refuse() -> None:
    for args in [("", "i", TS), ("u", 1.5, TS), ("u", "i", -1), ("u", "i", 1.0), (True, "i", TS), ("u", "i", TS, "")]:
        with pytest.raises(BadEvent):
            encode_event(*args)  # type: ignore[arg-type]


def test_encode_event_is_compact_and_keyed_by_user() -> None:
    key, raw = encode_event(42, "1193", TS)
    assert key == b"42"
    assert raw == b'{"user_id":"42","item_id":"1193","ts":978300760000}'


# ----- properties -----------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
id_fields = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=300) | st.just("u")
records = st.fixed_dictionaries({}, optional={"user_id": id_fields, "item_id": id_fields, "event_id": id_fields,
                                              "ts": st.none() | st.integers() | st.floats() | st.just(TS),
                                              "extra": json_values})


def check_invariants(ev: Event) -> None:
    for text in (ev.user_id, ev.item_id, *([ev.event_id] if ev.event_id is not None else [])):
        assert isinstance(text, str) and 1 <= len(text) <= MAX_ID_CHARS
        assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)
        text.encode("utf-8")  # no lone surrogates: ids become Kafka and store keys
    assert isinstance(ev.ts, int) and not isinstance(ev.ts, bool) and 0 <= ev.ts <= MAX_TS_MS


def parse_or_refuse(raw: bytes | None, key: bytes | None, kafka_ts: int | None) -> None:
    try:
        ev = parse_event(raw, key, kafka_ts, max_value_bytes=4096)
    except BadEvent as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    check_invariants(ev)
    if key is not None:
        assert key.decode("utf-8", "replace") == ev.user_id


kafka_ts = st.none() | st.integers(min_value=-2, max_value=MAX_TS_MS + 2)
keys = st.none() | st.binary(max_size=8) | st.just(b"u")
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(raw=st.none() | st.binary(max_size=64), key=keys, kafka_ts=kafka_ts)
def test_arbitrary_bytes_parse_or_are_refused(raw: bytes | None, key: bytes | None, kafka_ts: int | None) -> None:
    parse_or_refuse(raw, key, kafka_ts)


@FAST
@given(obj=json_values, key=keys, kafka_ts=kafka_ts)
def test_arbitrary_json_values_parse_or_are_refused(obj: Any, key: bytes | None, kafka_ts: int | None) -> None:
    parse_or_refuse(json.dumps(obj).encode(), key, kafka_ts)


@FAST
@given(obj=records, key=keys, kafka_ts=kafka_ts)
def test_arbitrary_event_shaped_records_parse_or_are_refused(obj: dict, key: bytes | None,
                                                             kafka_ts: int | None) -> None:
    parse_or_refuse(json.dumps(obj).encode(), key, kafka_ts)


valid_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=MAX_ID_CHARS)
valid_ids = valid_text | st.integers(min_value=-(10**200), max_value=10**200)


@FAST
@given(user=valid_ids, item=valid_ids, ts=st.integers(min_value=0, max_value=MAX_TS_MS),
       event_id=st.none() | valid_ids)
def test_encode_then_parse_round_trips(user: str | int, item: str | int, ts: int, event_id: str | int | None) -> None:
    key, raw = encode_event(user, item, ts, event_id)
    ev = parse_event(raw, key, None, max_value_bytes=1 << 20)
    assert ev == Event(str(user), str(item), ts, None if event_id is None else str(event_id))
    check_invariants(ev)
