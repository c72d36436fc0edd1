"""The items control records (stream/catalogue.py): what a worker makes of each, in order."""

from __future__ import annotations

import json

import pytest

from stream.catalogue import BadItemId, Blocked, check_item_id, parse


def _status(status: str) -> bytes:
    return json.dumps({"status": status, "ts": 1, "by": "test"}).encode()


def test_the_newest_record_of_an_item_wins_and_a_tombstone_unblocks() -> None:
    blocked = Blocked()
    assert blocked.apply([(b"a", _status("blocked")), (b"b", _status("blocked"))])
    assert blocked.items == {"a", "b"}
    assert blocked.apply([(b"a", _status("active")), (b"b", None)]) and blocked.items == set()
    assert not blocked.apply([(b"c", _status("active"))])  # unblocking what is not blocked changes nothing


@pytest.mark.parametrize("key, value", [(None, _status("blocked")), (b"", _status("blocked")),
                                        (b"x" * 257, _status("blocked")), (b"\xff", _status("blocked")),
                                        (b"a", b"{not json"), (b"a", b"[1]"), (b"a", _status("hidden")),
                                        (b"a", b"null")])
def test_a_malformed_record_is_skipped_and_the_records_around_it_apply(key: bytes | None, value: bytes) -> None:
    assert parse(key, value) is None
    blocked = Blocked()
    blocked.apply([(b"before", _status("blocked")), (key, value), (b"after", _status("blocked"))])
    assert blocked.items == {"before", "after"}


def test_an_operator_cannot_block_an_id_no_event_could_carry() -> None:
    assert check_item_id("i7") == "i7"
    for bad in ("", "x" * 257):
        with pytest.raises(BadItemId):
            check_item_id(bad)
