"""state/store.py's PartitionStore, one partition's RocksDB: it survives a reopen, and its count is RocksDB's
estimate, not a scan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rocksdict import Rdict

from state.store import PartitionStore


def test_partition_store_survives_reopen(tmp_path: Path) -> None:
    from state.record import UserRecord

    part = PartitionStore(tmp_path / "p0")
    part.write({b"u:x": UserRecord(b"\x00" * 8, "v1", np.array([3, -1], np.int32), ["new"], 0, 7, 1).encode()}, 4)
    part.close()
    again = PartitionStore(tmp_path / "p0")
    record = again.get("x")
    assert record is not None and record.offset == 7 and record.unknown == ["new"] and again.changelog_offset == 4
    again.close()


def test_the_state_count_is_rocksdbs_estimate_not_a_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/metrics reads the count on the event loop: it must not iterate every key."""
    from state.record import UserRecord
    from state.store import StateStore

    store = StateStore(tmp_path / "state")
    record = UserRecord(b"\x00" * 8, "v1", np.array([3], np.int32), [], 0, 7, 1)
    for p in range(3):
        store.commit({p: ({f"u{k}": record for k in range(2000)}, 10)})
    monkeypatch.setattr(Rdict, "keys", lambda *a, **k: (_ for _ in ()).throw(AssertionError("scanned")))
    monkeypatch.setattr(Rdict, "items", lambda *a, **k: (_ for _ in ()).throw(AssertionError("scanned")))
    assert 0.95 * 6000 <= store.count() <= 1.05 * 6000
    store.close()


