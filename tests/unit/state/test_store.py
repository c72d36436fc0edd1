"""state/store.py without Kafka: expiry of idle states (a bounded scan that goes on where it stopped, tombstones
through the changelog first) and resets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from state.record import UserRecord
from state.store import StateStore, user_key


class RecordingChangelog:
    """Stands in for the changelog topic: records what is published, acknowledges at once."""

    def __init__(self) -> None:
        self.published: list[dict[int, dict[bytes, bytes | None]]] = []

    def publish(self, entries: dict[int, dict[bytes, bytes | None]]) -> dict[int, int]:
        self.published.append(entries)
        return {p: len(self.published) * 1000 for p in entries}

    def claim(self, partition: int) -> None:
        pass

    def claimed(self, partition: int) -> bool:
        return True

    def read(self, partition: int, start: int):
        return iter(())

    def close(self) -> None:
        pass


def _record(updated_ms: int) -> UserRecord:
    return UserRecord(b"\x00" * 8, "v000001", np.array([3], np.int32), [], 0, 1, updated_ms)


def test_idle_states_expire_through_the_changelog_a_bounded_scan_at_a_time(tmp_path: Path) -> None:
    changelog = RecordingChangelog()
    store = StateStore(tmp_path / "state", changelog)  # type: ignore[arg-type]
    old = {f"old{k:02d}": _record(1_000) for k in range(10)}
    fresh = {f"new{k:02d}": _record(9_000) for k in range(15)}
    store.commit({0: ({**old, **fresh}, 41)})
    expired = [store.expire(0, updated_before_ms=5_000, max_scan=10) for _ in range(4)]
    assert sum(expired) == 10 and expired[-1] == 0, f"three scans of 10 cover 25 records: {expired}"
    assert all(store.get(0, u) is None for u in old) and all(store.get(0, u) is not None for u in fresh)
    tombstones = {k for batch in changelog.published[1:] for k, v in batch[0].items() if v is None}
    assert tombstones == {user_key(u) for u in old}, "each expiry went to the changelog as a tombstone"
    assert store.applied_offset(0) == 41, "expiry leaves the applied marker alone"
    assert store.partition(0).changelog_offset == 1000 * len(changelog.published), "local copy follows the changelog"
    store.close()


def test_a_reset_deletes_every_state_and_the_marker_in_the_changelog_first(tmp_path: Path) -> None:
    changelog = RecordingChangelog()
    store = StateStore(tmp_path / "state", changelog)  # type: ignore[arg-type]
    store.commit({1: ({"a": _record(1), "b": _record(2)}, 7)})
    store.reset(1)
    assert store.get(1, "a") is None and store.get(1, "b") is None and store.applied_offset(1) == -1
    assert set(changelog.published[-1][1]) == {user_key("a"), user_key("b"), b"m:offset"}
    assert all(v is None for v in changelog.published[-1][1].values())
    store.close()


def test_the_input_identity_is_read_once_per_rebalance_and_a_new_one_resets_the_partitions(tmp_path: Path) -> None:
    reads: list[bytes] = []
    identity = [b"A" * 16]

    def read_identity() -> bytes:
        reads.append(identity[0])
        return identity[0]

    store = StateStore(tmp_path / "state", RecordingChangelog(), input_identity=read_identity)  # type: ignore[arg-type]
    for p in (0, 1):
        store.ensure_ready(p)
        store.commit({p: ({"u": _record(1)}, 5)})
    assert len(reads) == 1, "one topic, one read for all its partitions"
    identity[0] = b"B" * 16  # the topic was deleted and re-created
    store.mark_stale()
    for p in (0, 1):
        store.ensure_ready(p)
        assert store.get(p, "u") is None and store.applied_offset(p) == -1
    assert len(reads) == 2
    store.close()
