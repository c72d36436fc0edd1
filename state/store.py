"""The per-user state store: RocksDB per input partition, made durable and movable by a changelog topic.

The contract (what is durable when, what an offset means, one writer per partition, restore, deletion) is
written once, in state/README.md. Here: :class:`PartitionStore` (one partition's RocksDB), :class:`Changelog`
(the changelog's transactional writers, one per partition, and its reader) and :class:`StateStore` (the two
together, the API the worker uses: ``ensure_ready``, ``get``, ``commit``, ``reset``, ``expire``).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from rocksdict import AccessType, DbClosedError, Options, Rdict, WriteBatch

from lrustream.kernel.errors import LrustreamError
from lrustream.kernel.kafka import flush, produce
from state.record import UserRecord, updated_ms_of

log = logging.getLogger("lrustream.state")

USER_PREFIX = b"u:"
APPLIED_KEY = b"m:offset"  # highest input offset applied (local and in the changelog)
CHANGELOG_KEY = b"m:changelog"  # changelog offset the local copy includes (local only)
_I64 = struct.Struct("<q")


class StateError(LrustreamError):
    """The store cannot make a batch durable (changelog unreachable, disk error), or cannot read it (disk error).
    Nothing was acknowledged."""


class StoreIOError(StateError):
    """The local RocksDB failed a read or a write (an I/O error, a corrupt file, a lock held elsewhere, the
    database closed): a fault of the store, never of the event being applied. rocksdict raises these as a bare
    ``Exception`` ("IO error: ...", "Corruption: ...") or ``DbClosedError``, which a caller cannot tell from a
    bug; :class:`PartitionStore` raises this instead, around each rocksdict call and only there."""


class Fenced(StateError):
    """Another worker has claimed the partition since this one did (a rebalance moved it): nothing of the batch
    was committed, and this worker may write the partition again only after claiming and restoring it anew."""


def user_key(user: str) -> bytes:
    return USER_PREFIX + user.encode()


class _RocksDB:
    """``with`` around a rocksdict call: what rocksdict raises for RocksDB's own failures (a bare ``Exception``,
    ``DbClosedError``) leaves as :class:`StoreIOError`; anything else (a ``KeyError`` for a key of the wrong type,
    an error of the caller's) leaves as it came. One instance per store and action: nothing is allocated per call."""

    __slots__ = ("action", "path")

    def __init__(self, path: Path, action: str) -> None:
        self.path, self.action = path, action

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.check(exc)

    def check(self, exc: BaseException) -> None:
        """Raise StoreIOError if ``exc`` is rocksdict's own failure; return otherwise (the caller re-raises)."""
        if type(exc) is Exception or isinstance(exc, DbClosedError):
            raise StoreIOError(f"state store {self.path}: {self.action} failed: {exc}") from exc


class PartitionStore:
    """The local RocksDB of one input partition."""

    def __init__(self, path: Path, read_only: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        access = AccessType.read_only() if read_only else AccessType.read_write()
        self.path = path
        self._reading, self._writing = _RocksDB(path, "read"), _RocksDB(path, "write")
        with _RocksDB(path, "open"):
            self.db = Rdict(str(path), Options(raw_mode=True), access_type=access)

    def get(self, user: str) -> UserRecord | None:
        try:  # the hottest read: a ``try`` costs nothing until it raises, a ``with`` ~0.2 us a call
            blob = self.db.get(user_key(user))
        except Exception as exc:
            self._reading.check(exc)
            raise
        return None if blob is None else UserRecord.decode(blob)

    def _meta(self, key: bytes) -> int:
        with self._reading:
            blob = self.db.get(key)
        return -1 if blob is None else _I64.unpack_from(blob)[0]

    @property
    def applied_offset(self) -> int:
        return self._meta(APPLIED_KEY)

    @property
    def applied_identity(self) -> bytes | None:
        """The input topic identity the applied marker was written for (None: not recorded)."""
        with self._reading:
            blob = self.db.get(APPLIED_KEY)
        return None if blob is None or len(blob) <= _I64.size else blob[_I64.size:]

    @property
    def changelog_offset(self) -> int:
        return self._meta(CHANGELOG_KEY)

    def write(self, entries: dict[bytes, bytes | None], changelog_offset: int) -> None:
        """Atomically write raw entries (user records and/or the applied marker; None deletes) and the changelog
        position."""
        batch = WriteBatch(raw_mode=True)
        for key, value in entries.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        batch.put(CHANGELOG_KEY, _I64.pack(changelog_offset))
        with self._writing:
            self.db.write(batch)

    def users(self) -> Iterator[tuple[str, UserRecord]]:
        for key, value in self.scan():
            yield key[len(USER_PREFIX):].decode(), UserRecord.decode(value)

    def scan(self, start: bytes = USER_PREFIX) -> Iterator[tuple[bytes, bytes]]:
        """Raw (key, value) of the user records in key order, from ``start`` (a user key, or the first)."""
        with self._reading:
            items = iter(self.db.items(from_key=start))
        while True:
            with self._reading:
                entry = next(items, None)
            if entry is None or not entry[0].startswith(USER_PREFIX):
                return
            yield entry

    def user_keys(self) -> list[bytes]:
        """The keys of every user record."""
        with self._reading:
            return [key for key in self.db.keys(from_key=USER_PREFIX) if key.startswith(USER_PREFIX)]

    def count(self) -> int:
        """User records, from RocksDB's key estimate (constant time: /metrics calls it on the event loop, and a
        scan of every key would stall the worker on a large store); the applied and changelog markers are
        subtracted once written."""
        with self._reading:
            keys = self.db.property_int_value("rocksdb.estimate-num-keys") or 0
            markers = sum(self.db.get(k) is not None for k in (APPLIED_KEY, CHANGELOG_KEY))
        return max(0, keys - markers)

    def close(self) -> None:
        self.db.close()


class NotReady(LrustreamError):
    """A read of a partition this process has not restored since the last rebalance."""


class Changelog:
    """The changelog topic: partition ``p`` mirrors the store of input partition ``p`` (compacted by key).

    Each partition has one writer at a time, and Kafka enforces it: ``claim(p)`` opens a transactional producer
    whose ``transactional.id`` is the partition's, which fences every earlier producer of that id (a former
    owner, perhaps in the middle of a batch) and aborts its open transaction. ``publish`` writes each partition's
    entries in one transaction; a fenced writer's transaction is refused by the broker (:class:`Fenced`), so a
    former owner's records never land after the new owner's. Readers (``read``) see committed transactions only.
    """

    def __init__(self, conf: dict[str, Any], topic: str, flush_timeout_s: float = 30.0) -> None:
        self.conf = conf
        self.topic = topic
        self.flush_timeout_s = flush_timeout_s
        self.stopping = threading.Event()  # set on shutdown: stop waiting for acknowledgements (nothing is lost)
        self._writers: dict[int, Any] = {}  # partition -> its transactional producer, while this process holds it
        self._committer = ThreadPoolExecutor(max_workers=8, thread_name_prefix="changelog-commit")

    def transactional_id(self, partition: int) -> str:
        return f"lrustream.{self.topic}.p{partition}"

    def claim(self, partition: int) -> None:
        """Become the only writer of ``partition`` (before restoring it: what is read then is every commit that any
        earlier writer can ever make)."""
        from confluent_kafka import KafkaException, Producer

        self._drop(partition)
        producer = Producer({**self.conf, "transactional.id": self.transactional_id(partition), "acks": "all",
                             "linger.ms": 2, "compression.type": "lz4"})
        try:
            producer.init_transactions(self.flush_timeout_s)
        except KafkaException as exc:
            raise StateError(f"changelog {self.topic}[{partition}]: could not claim the partition: "
                             f"{exc.args[0]}") from exc
        self._writers[partition] = producer

    def claimed(self, partition: int) -> bool:
        return partition in self._writers

    def _drop(self, partition: int) -> None:
        """Forget the partition's producer (after a failure its transaction state is unknown: claim again)."""
        if (producer := self._writers.pop(partition, None)) is not None:
            producer.flush(0)

    def publish(self, entries: dict[int, dict[bytes, bytes | None]]) -> dict[int, int]:
        """Write each partition's entries in one transaction of its writer and commit them all; return each
        partition's last offset. Raises :class:`Fenced` if another worker has claimed one of the partitions,
        :class:`StateError` for anything else; either way the partitions must be claimed again before the next
        publish, and what was not committed is never seen by a reader."""
        from confluent_kafka import KafkaException

        if missing := [p for p in entries if p not in self._writers]:
            raise StateError(f"changelog {self.topic}: partitions {missing} are not claimed by this worker")
        errors: list[Any] = []
        last = dict.fromkeys(entries, -1)

        def done(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(err)
            else:
                last[msg.partition()] = max(last[msg.partition()], msg.offset())

        try:
            for partition, items in entries.items():
                self._writers[partition].begin_transaction()
                self._produce(partition, items, done)
            if len(entries) == 1:
                self._commit(next(iter(entries)), errors)
            else:  # each commit is a few round trips to the coordinator: wait for them side by side
                commits = [self._committer.submit(self._commit, p, errors) for p in entries]
                wait(commits)
                for commit in commits:
                    commit.result()
        except (KafkaException, StateError) as exc:
            for partition in entries:
                self._drop(partition)
            raise self._failure(entries, exc) from exc
        return last

    def _produce(self, partition: int, items: dict[bytes, bytes | None], done: Callable[[Any, Any], None]) -> None:
        for key, value in items.items():
            produce(self._writers[partition], self.topic, value, key, partition=partition, on_delivery=done,
                    before_wait=self._check_stopping)

    def _commit(self, partition: int, errors: list[Any]) -> None:
        """Wait for the partition's records (in half-second slices, so a stop is seen), then commit."""
        from confluent_kafka import KafkaException

        producer = self._writers[partition]
        deadline = time.monotonic() + self.flush_timeout_s
        remaining = flush(producer, self.flush_timeout_s, before_wait=lambda _pending: self._check_stopping())
        if errors:
            raise KafkaException(errors[0])
        if remaining:
            raise StateError(f"changelog {self.topic}[{partition}] not acknowledged: {remaining} records pending")
        producer.commit_transaction(max(1.0, deadline - time.monotonic()))

    def _failure(self, entries: dict[int, Any], exc: Exception) -> StateError:
        from confluent_kafka import KafkaError

        if isinstance(exc, StateError):
            return exc
        err = exc.args[0] if exc.args else None
        fencing = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
        if getattr(err, "code", lambda: None)() in fencing:
            return Fenced(f"changelog {self.topic}: another worker has claimed partition(s) {sorted(entries)} "
                          f"since this one did (a rebalance moved them)")
        return StateError(f"changelog {self.topic} not acknowledged: {err}")

    def _check_stopping(self) -> None:
        if self.stopping.is_set():
            raise StateError(f"stopping before changelog {self.topic} acknowledged the batch (not committed)")

    def read(self, partition: int, start: int, timeout_s: float = 30.0
             ) -> Iterator[tuple[int, bytes, bytes | None]]:
        """(offset, key, value) from ``start`` (or the beginning when < 0) to the end seen when called."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        consumer = Consumer({**self.conf, "group.id": f"{self.topic}-restore", "enable.auto.commit": False,
                             "enable.partition.eof": False, "auto.offset.reset": "earliest",
                             "isolation.level": "read_committed"})
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=timeout_s)
            begin = max(start, low) if start >= 0 else OFFSET_BEGINNING
            if high <= 0 or (start >= 0 and start >= high):
                return
            consumer.assign([TopicPartition(self.topic, partition, begin)])
            position, moved_at = begin, time.monotonic()
            while True:  # the end is a transaction marker, never delivered: watch the position pass it
                for msg in consumer.consume(num_messages=2000, timeout=0.1):
                    if msg.error():
                        raise StateError(f"changelog {self.topic}[{partition}] read failed: {msg.error()}")
                    yield msg.offset(), msg.key(), msg.value()
                now = consumer.position([TopicPartition(self.topic, partition)])[0].offset
                if now >= high:
                    return
                if now > position:
                    position, moved_at = now, time.monotonic()
                elif time.monotonic() - moved_at > timeout_s:
                    raise StateError(f"changelog {self.topic}[{partition}] read stalled at offset {now} of {high} "
                                     f"for {timeout_s:.0f} s")
        finally:
            consumer.close()

    def close(self) -> None:
        """Let go of every partition. A transaction still open (a batch abandoned on stop) is never committed: the
        next claim of its partition aborts it."""
        for partition in list(self._writers):
            self._drop(partition)
        self._committer.shutdown(wait=False)


class StateStore:
    """All partitions this process serves, plus the changelog that makes them durable and movable."""

    def __init__(self, root: str | Path, changelog: Changelog | None = None,
                 input_identity: Callable[[], bytes | None] | None = None) -> None:
        self.root = Path(root)
        self.changelog = changelog
        self.input_identity = input_identity  # the input topic's identity now (None: unknown)
        self._identity = b""  # as last read; written with every applied marker
        self._identity_read = False  # read since the last rebalance (one topic: one read serves every partition)
        self._expiry_cursor: dict[int, bytes] = {}  # per partition, the key the next expiry scan starts at
        self._parts: dict[int, PartitionStore] = {}
        self._ready: set[int] = set()
        self._lock = threading.Lock()

    def partition(self, p: int) -> PartitionStore:
        if p not in self._parts:
            self._parts[p] = PartitionStore(self.root / f"p{p}")
        return self._parts[p]

    def mark_stale(self) -> None:
        """Partitions may have moved (a rebalance): restore each again before its next event."""
        with self._lock:
            self._ready.clear()
            self._identity_read = False

    def ready_partitions(self) -> list[int]:
        """Partitions restored since the last rebalance (those this process serves now)."""
        with self._lock:
            return sorted(self._ready)

    def ensure_ready(self, p: int) -> int:
        """Claim and restore partition ``p`` unless done since the last rebalance (and still claimed: a failed
        commit lets the partition go); return records read."""
        with self._lock:
            if p in self._ready and (self.changelog is None or self.changelog.claimed(p)):
                return 0
            if self.changelog is not None:
                self.changelog.claim(p)  # first: no earlier owner can commit after the restore below has read
            n = self.restore(p)
            self._check_identity(p)
            self._ready.add(p)
            return n

    def _check_identity(self, p: int) -> None:
        if self.input_identity is None:
            return
        if not self._identity_read:
            if (read := self.input_identity()) is None:
                return  # unknown for now (broker unreachable): checked again at the next partition
            self._identity, self._identity_read = read, True
        current = self._identity
        part = self.partition(p)
        stored = part.applied_identity
        if stored is not None and stored != current and part.applied_offset >= 0:
            log.error("partition %d: the input topic was re-created (identity %s, the states were made under %s); "
                      "its offsets start again, so this partition's %d states are deleted and serving starts from "
                      "scratch", p, current.hex(), stored.hex(), part.count())
            self.reset(p)

    def reset(self, p: int) -> None:
        """Delete every state of partition ``p`` and its applied marker, in the changelog (tombstones) first."""
        self._delete(p, [*self.partition(p).user_keys(), APPLIED_KEY])

    def expire(self, p: int, updated_before_ms: int, max_scan: int = 10_000) -> int:
        """Delete the states of partition ``p`` last updated before ``updated_before_ms`` (changelog tombstones
        first); scans at most ``max_scan`` records, going on where the previous call stopped. Returns how many."""
        part = self.partition(p)
        start = self._expiry_cursor.get(p, USER_PREFIX)
        expired: list[bytes] = []
        cursor = USER_PREFIX
        for scanned, (key, value) in enumerate(part.scan(start), start=1):
            if updated_ms_of(value) < updated_before_ms:
                expired.append(key)
            if scanned >= max_scan:
                cursor = key + b"\x00"  # the next call starts just after this key
                break
        self._expiry_cursor[p] = cursor
        if expired:
            self._delete(p, expired)
        return len(expired)

    def _delete(self, p: int, keys: list[bytes]) -> None:
        part = self.partition(p)
        entries: dict[bytes, bytes | None] = dict.fromkeys(keys)
        position = part.changelog_offset
        if self.changelog is not None:
            position = self.changelog.publish({p: entries})[p]
        part.write(entries, position)

    def restore(self, p: int) -> int:
        """Apply the changelog of partition ``p`` past the local copy's position; return records applied."""
        part = self.partition(p)
        if self.changelog is None:
            return 0
        entries: dict[bytes, bytes | None] = {}
        start = last = part.changelog_offset
        applied = 0
        for offset, key, value in self.changelog.read(p, start + 1):
            entries[key] = value
            last = offset
            if len(entries) >= 10_000:
                part.write(entries, last)
                applied += len(entries)
                entries = {}
        if last != start:
            part.write(entries, last)
            applied += len(entries)
            log.info("partition %d: applied %d changelog records (offsets %d..%d)", p, applied, start + 1, last)
        return applied

    def get(self, p: int, user: str) -> UserRecord | None:
        return self.partition(p).get(user)

    def read(self, p: int, user: str) -> UserRecord | None:
        """:meth:`get` for readers on other threads (requests): the committed record, from a partition restored
        since the last rebalance only (:class:`NotReady` otherwise: being restored, or not this process's)."""
        part = self._parts.get(p)
        if p not in self._ready or part is None:
            raise NotReady(f"partition {p} is not restored here (it is being restored, or another worker owns it)")
        return part.get(user)

    def applied_offset(self, p: int) -> int:
        return self.partition(p).applied_offset

    def commit(self, batches: dict[int, tuple[dict[str, UserRecord], int]]) -> None:
        """Make a micro-batch durable. ``batches`` maps partition -> (records, highest input offset applied).

        Changelog first (all partitions, one acknowledged flush), then one atomic WriteBatch per partition.
        """
        entries = {p: self._entries(records, applied) for p, (records, applied) in batches.items()}
        positions = {p: self.partition(p).changelog_offset for p in batches}
        if self.changelog is not None:
            positions = self.changelog.publish(entries)
        for p, part_entries in entries.items():
            self.partition(p).write(part_entries, positions[p])

    def _entries(self, records: dict[str, UserRecord], applied: int) -> dict[bytes, bytes | None]:
        entries: dict[bytes, bytes | None] = {user_key(u): r.encode() for u, r in records.items()}
        entries[APPLIED_KEY] = _I64.pack(applied) + self._identity
        return entries

    def count(self) -> int:
        """User records in the local partitions (an estimate: see PartitionStore.count)."""
        return sum(part.count() for part in self._parts.values())

    def close(self) -> None:
        for part in self._parts.values():
            part.close()
        self._parts.clear()
        self._ready.clear()
        if self.changelog is not None:
            self.changelog.close()


def find_user(root: str | Path, user: str) -> tuple[int, UserRecord] | None:
    """Look a user up in every local partition store (read-only: safe while a worker runs)."""
    for path in sorted(Path(root).glob("p*")):
        if not path.name[1:].isdigit():
            continue
        part = PartitionStore(path, read_only=True)
        try:
            record = part.get(user)
        finally:
            part.close()
        if record is not None:
            return int(path.name[1:]), record
    return None
