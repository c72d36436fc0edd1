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




class _FailingDb:
    """A rocksdict database whose reads, writes and scans raise ``error`` (everything else reaches the real one)."""

    def __init__(self, db: Rdict, error: BaseException) -> None:
        self.db, self.error = db, error

    def get(self, *args: object, **kwargs: object) -> None:
        raise self.error

    def write(self, *args: object, **kwargs: object) -> None:
        raise self.error

    def items(self, *args: object, **kwargs: object) -> object:
        real = self.db.items(*args, **kwargs)

        def failing() -> object:  # the first entry, then the failure: a scan that breaks half-way
            yield next(iter(real))
            raise self.error

        return failing()

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)


def _part_with_users(tmp_path: Path) -> PartitionStore:
    from state.record import UserRecord

    part = PartitionStore(tmp_path / "p0")
    record = UserRecord(b"\x00" * 8, "v1", np.array([3], np.int32), [], 0, 7, 1).encode()
    part.write({b"u:a": record, b"u:b": record}, 4)
    return part


def test_rocksdbs_own_failures_leave_the_store_as_one_state_error(tmp_path: Path) -> None:
    """Real rocksdict failures, each a bare ``Exception`` or ``DbClosedError`` as rocksdict raises them: the lock
    of a database open elsewhere, and every read and write of a closed one. Each leaves as StoreIOError (a
    StateError: the processor's infrastructure faults), naming the store and the action, rocksdict's error as
    its cause."""
    from rocksdict import DbClosedError

    from state.store import StateError, StoreIOError

    part = _part_with_users(tmp_path)
    with pytest.raises(StoreIOError, match=r"p0: open failed: IO error: .*lock") as opened:
        PartitionStore(tmp_path / "p0")
    assert type(opened.value.__cause__) is Exception and isinstance(opened.value, StateError)
    part.close()
    reads = {"get": lambda: part.get("a"), "applied_offset": lambda: part.applied_offset,
             "applied_identity": lambda: part.applied_identity, "count": part.count,
             "users": lambda: list(part.users()), "scan": lambda: list(part.scan()), "user_keys": part.user_keys}
    for name, read in reads.items():
        with pytest.raises(StoreIOError, match="p0: read failed: DB instance already closed") as failed:
            read()
        assert isinstance(failed.value.__cause__, DbClosedError), name
    with pytest.raises(StoreIOError, match="p0: write failed: DB instance already closed"):
        part.write({b"u:c": None}, 5)


def test_a_failed_read_or_write_is_a_store_io_error_and_nothing_else_is(tmp_path: Path) -> None:
    """rocksdict's kind of failure (a bare ``Exception`` with RocksDB's status) in a read, a write or half-way
    through a scan becomes StoreIOError; any other exception (not RocksDB's: a bug) leaves unchanged."""
    from state.store import StateStore, StoreIOError

    part = _part_with_users(tmp_path)
    real = part.db
    part.db = _FailingDb(real, Exception("IO error: While pread offset 0 len 4096: 000007.sst: Input/output error"))
    with pytest.raises(StoreIOError, match="p0: read failed: IO error: While pread"):
        part.get("a")
    with pytest.raises(StoreIOError, match="p0: read failed"):
        part.applied_offset  # noqa: B018
    with pytest.raises(StoreIOError, match="p0: write failed: IO error"):
        part.write({b"u:c": None}, 5)
    scan = part.scan()
    assert next(scan)[0] == b"u:a"
    with pytest.raises(StoreIOError, match="p0: read failed"):
        next(scan)
    store = StateStore(tmp_path)  # the store's scans (expiry) go through the partition's
    store._parts[0] = part
    with pytest.raises(StoreIOError):
        store.expire(0, updated_before_ms=10**15)
    for bug in (KeyError("raw mode only support bytes"), ValueError("not RocksDB's")):
        part.db = _FailingDb(real, bug)
        with pytest.raises(type(bug)) as raised:
            part.get("a")
        assert raised.value is bug
        with pytest.raises(type(bug)):
            part.write({b"u:c": None}, 5)
    part.db = real
    assert part.get("a") is not None and part.applied_offset == -1
    part.close()
