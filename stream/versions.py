"""The ``model-versions`` topic: how model versions reach every host, with nothing shared but the broker.

Contract (also in stream/README.md, "Model versions"):

- One compacted topic (``topics.model_versions``, one partition). Keys are UTF-8:

  ``v000007/<upload>/<file>/<offset>``  a chunk: the bytes of ``file`` (meta.json, vocab.json,
                                        weights.safetensors) from ``offset`` on, at most ``chunk_bytes``, under
                                        the broker's record limit
  ``v000007/<upload>/done``             the version is whole: JSON ``{"version", "upload", "chunk_bytes",
                                        "files": [{"name", "size", "sha256"}], "sha256", "ts", "by"}``, where
                                        ``sha256`` covers the files in that order, one after the other
  ``v000007/<upload>/collected``        gc removed the version's weights (their chunks are tombstoned); its
                                        meta.json and vocab.json stay, because stored states name them
  ``@current`` ``@pin`` ``@shadow``     JSON ``{"version", "reason", "by", "ts"}``; a null value clears ``@pin``
                                        and ``@shadow``

  ``<upload>`` is a random id per publishing attempt (letters, digits, ``_`` and ``-``, at most 64): the chunks of
  a publish that died never mix with another's. ``<offset>`` is a decimal number below :data:`MAX_OFFSET`.
- A record that breaks this contract (a malformed key, a chunk a reader cannot write, a value that does not
  parse) costs only itself: readers log it ("ignoring record at ..."), count it (``VersionLog.bad_records``) and
  go on with the records after it, in the same batch too; gc tombstones records whose key is malformed.
- A version becomes visible only at its ``done`` record, which its publisher produces after every chunk was
  acknowledged: a reader (:class:`VersionLog`) writes chunks into a scratch folder of its own model store and, at
  ``done``, checks every file's size and sha256 and the checksum of the whole before installing the version
  (models/store.py ``install``). A version that fails is refused (logged; workers list it in ``/model``) and never
  visible; so is a second upload under a number another upload completed first: the first ``done`` record of a
  number in the topic's order claims it on every host, even on a host that refused to install it (its store holds
  another version under that number), so no host ever takes the second upload's bytes for that number. Chunks
  that arrive in the order the publisher sends them (files in the ``done`` record's order, each by offset) are
  hashed as they are written, so a version of hundreds of MB is not read back for the check; chunks in any other
  order are accepted too, and their files are then read back and hashed at ``done``.
- Serving: ``@pin`` when set, else ``@current``. Every reader mirrors that, and ``@shadow``, into its store's
  CURRENT, PINNED and SHADOW once the version named is installed there; workers hot-swap to CURRENT as before
  (stream/worker.py). Publishing writes ``@current``, so while an operator pins serving a new version is stored
  but not served. Rollback writes ``@pin`` and ``@current``; unpin writes ``@current`` = the pinned version, then
  clears ``@pin``: serving stays until the next publish.
- Numbers only grow: a publisher reads the topic to its end first and numbers its version above every number
  the topic holds, chunks of dead publishes included. Two publishers racing for a number: the first complete
  upload wins everywhere and the other publishes again under the next number; a ``push`` (which keeps its
  store's number) that loses is refused with VersionConflict, its version never visible.

Every record is produced with acks=all, and each step waits for the acknowledgement of the one before: chunks,
then ``done``, then ``@current``. A SIGKILL at any point leaves only complete versions visible
(tests/integration/test_versions.py kills a publish half-way).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrustream.kernel.config import Config
from lrustream.kernel.errors import LrustreamError
from lrustream.kernel.kafka import (
    Deliveries,
    assigned_reader,
    await_deliveries,
    produce,
    producer_config,
    quiet_logger,
    read_to_end,
)
from models.base import SeqRecModel
from models.store import META, VOCAB, WEIGHTS, ModelStore, ModelStoreError, VersionInfo, check_version_name
from models.vocab import Vocabulary

log = logging.getLogger("lrustream.versions")

CHUNK_BYTES = 512 * 1024  # well under Kafka's default record limit (message.max.bytes, 1 MiB)
FILES = (META, VOCAB, WEIGHTS)
POINTERS = ("@current", "@pin", "@shadow")
PUBLISH_TRIES = 3  # numbers tried when other publishers keep taking the one chosen
SCRATCH = ".incoming-"
STRAY_AGE_S = 600.0  # an upload silent this long, below a complete number, is a dead publish (gc removes it)
CONSUME_AT_ONCE = 64  # records per consume call: at most 32 MiB of chunks in memory
# One partition holds every chunk, and librdkafka fetches at most 1 MiB of a partition per request by default: a
# version of hundreds of MB would take as many round trips. A fetch may exceed the broker's record limit (it
# carries many records); librdkafka prefetches at most queued.max.messages.kbytes (64 MiB) ahead of the reader.
READER_SETTINGS = {"max.partition.fetch.bytes": 16 * 1024 * 1024, "fetch.max.bytes": 64 * 1024 * 1024}
HASH_BLOCK = 1 << 20  # bytes read at a time when a file is checked from disk
PRODUCER_QUEUE_KB = 64 * 1024  # chunks a publisher holds unacknowledged at most (librdkafka's default: 1 GiB)
WHOLE = ""  # the key of the whole version's checksum among a file's checksums (no file has an empty name)
UPLOAD_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")  # what a key's <upload> may be: never a path, never too long
MAX_OFFSET = 1 << 40  # a chunk offset past this (1 TiB into a file) is a malformed key
OFFSET = re.compile(r"0|[1-9][0-9]{0,12}")  # a chunk's offset as written: decimal, no sign, no leading zero


class MalformedKey(ValueError):
    """A record whose key is no model-versions key (gc tombstones it)."""


def parse_key(key: str) -> tuple[str, str, list[str]]:
    """``version/upload/rest...`` of a key other than a pointer's: (version, upload, rest), checked so that no
    part can name a path outside a reader's scratch folder, a name too long for it or an offset no file has;
    MalformedKey otherwise."""
    if key.count("/") < 2:
        raise MalformedKey("not a model-versions key")
    version, upload, *rest = key.split("/")
    try:
        check_version_name(version)
    except ModelStoreError as exc:
        raise MalformedKey(str(exc)) from None
    if not UPLOAD_ID.fullmatch(upload):
        raise MalformedKey(f"invalid upload id {upload[:80]!r}")
    if rest in (["done"], ["collected"]):
        return version, upload, rest
    if len(rest) != 2 or rest[0] not in FILES:
        raise MalformedKey("not a model-versions key")
    if not OFFSET.fullmatch(rest[1]) or int(rest[1]) >= MAX_OFFSET:
        raise MalformedKey(f"invalid chunk offset {rest[1][:40]!r}")
    return version, upload, rest


class VersionConflict(LrustreamError):
    """Another upload completed the version number first; the publisher tries the next number."""


@dataclass
class Digests:
    """Checksums of an upload's files, computed as its chunks are written in the order the publisher sends them
    (file after file, offset after offset), so that the check at ``done`` reads nothing again. A file one of
    whose chunks came out of that order (or twice: a retried produce) has no checksum here and is read again from
    disk; so does the whole version once any chunk broke the order."""

    files: dict[str, Any] = field(default_factory=dict)  # name -> running sha256, None once out of order
    sizes: dict[str, int] = field(default_factory=dict)  # name -> bytes hashed
    whole: Any = field(default_factory=hashlib.sha256)  # None once out of order
    order: list[str] = field(default_factory=list)  # files in the order their first chunk came

    def add(self, name: str, offset: int, data: bytes) -> None:
        if name not in self.files:
            self.files[name], self.sizes[name] = (hashlib.sha256() if offset == 0 else None), 0
            self.order.append(name)
        in_order = self.files[name] is not None and offset == self.sizes[name]
        if not in_order:
            self.files[name] = None
        if not in_order or self.order[-1] != name:
            self.whole = None
        if self.files[name] is not None:
            self.files[name].update(data)
            self.sizes[name] += len(data)
        if self.whole is not None:
            self.whole.update(data)

    def known(self, done: Done) -> dict[str, str]:
        """The sha256 of each file hashed whole and in order, by name, and (key :data:`WHOLE`) of the whole
        version when every file of ``done`` was, in its order."""
        out = {f["name"]: h.hexdigest() for f in done.files
               if (h := self.files.get(f["name"])) is not None and self.sizes[f["name"]] == f["size"]}
        if self.whole is not None and self.order == [f["name"] for f in done.files] and len(out) == len(done.files):
            out[WHOLE] = self.whole.hexdigest()
        return out


@dataclass
class Upload:
    """A version's chunks as they arrive: a scratch folder, and for our own publish the folder they came from."""

    folder: Path
    own: bool = False
    done: Done | None = None  # its done record, kept while the version waits for a "collected" record
    digests: Digests = field(default_factory=Digests)
    sent: dict[str, str] = field(default_factory=dict)  # our own publish: the checksums it sent (Digests.known)


@dataclass
class Strays:
    """The chunk keys (not tombstoned) of an upload that has no ``done`` record, and when the last came."""

    keys: set[str] = field(default_factory=set)
    last_ms: int = 0


@dataclass
class Done:
    """A ``done`` record, parsed."""

    version: str
    upload: str
    chunk_bytes: int
    files: list[dict[str, Any]]
    sha256: str

    @classmethod
    def parse(cls, version: str, upload: str, value: bytes) -> Done:
        body = json.loads(value)
        files = [{"name": str(f["name"]), "size": int(f["size"]), "sha256": str(f["sha256"])} for f in body["files"]]
        if [f["name"] for f in files] not in ([META, VOCAB, WEIGHTS], [META, VOCAB]):
            raise ValueError(f"unexpected file list {[f['name'] for f in files]}")
        if body["version"] != version or body["upload"] != upload:
            raise ValueError("its version or upload differs from its key")
        if int(body["chunk_bytes"]) < 1 or not all(0 <= f["size"] < MAX_OFFSET for f in files):
            raise ValueError("its chunk size or a file size is out of range")
        return cls(version, upload, int(body["chunk_bytes"]), files, str(body["sha256"]))

    def weights_chunks(self) -> list[int]:
        """The offsets of the weights file's chunks (what gc tombstones)."""
        size = next((f["size"] for f in self.files if f["name"] == WEIGHTS), 0)
        return list(range(0, size, self.chunk_bytes)) or [0]


@dataclass
class TopicView:
    """What the topic said so far."""

    done: dict[str, Done] = field(default_factory=dict)  # installed versions: the upload that completed each
    first: dict[str, str] = field(default_factory=dict)  # version -> the upload of its first done record (the
    #                                                      number's owner everywhere, installed here or not)
    collected: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)  # version -> why it is not installed
    pointers: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(POINTERS))
    why: dict[str, dict[str, Any]] = field(default_factory=dict)  # pointer -> its record: reason, by, ts
    highest: int = 0  # the highest version number any record names

    def serving(self) -> str | None:
        return self.pointers["@pin"] or self.pointers["@current"]


class VersionLog:
    """Reads the model-versions topic from its beginning into a model store (its cache), and writes to it.

    One reader per process and store, used from one thread at a time; readers of the same store in other
    processes (a worker and an operator's shell on one host) each keep their own scratch folder."""

    def __init__(self, cfg: Config, store: ModelStore, who: str = "lrustream") -> None:
        self.cfg, self.store, self.who = cfg, store, who
        self.topic = cfg.topics.model_versions
        self.consumer, self.partitions = assigned_reader(cfg, self.topic, f"{cfg.stream.app_id}-versions",
                                                         from_beginning=True, **READER_SETTINGS)
        self.seen = TopicView()
        self.uploads: dict[tuple[str, str], Upload] = {}
        self.strays: dict[tuple[str, str], Strays] = {}  # chunks of uploads no done record completed
        self.strays_removed = 0  # chunks (and malformed records) the last gc tombstoned
        self.bad_records = 0  # records ignored because they break the topic's contract (logged each)
        self.malformed: set[bytes] = set()  # keys of records whose key is malformed, not tombstoned yet
        self.scratch = store.root / f"{SCRATCH}{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.new_refusals: list[tuple[str, str]] = []  # (version, why) not yet reported to the caller
        self._unserved: str | None = None  # a version a pointer names that is not installed here: logged once
        self._producer: Any = None
        _remove_dead_scratch(store.root)

    # ----- reading -----------------------------------------------------------------------------------------------
    def catch_up(self, timeout_s: float = 30.0) -> None:
        """Read up to the topic's end as it is now, installing versions and mirroring pointers; TimeoutError
        past ``timeout_s``."""
        for batch in read_to_end(self.consumer, self.topic, self.partitions, self._take, timeout_s):
            self._apply(batch)
        self._mirror()

    def poll(self, timeout_s: float) -> bool:
        """Apply what arrived, waiting up to ``timeout_s`` for the first record; True when anything did."""
        messages = self._take(timeout_s)
        if messages:  # nothing new: the store already mirrors what was read
            self._apply(messages)
            self._mirror()
        return bool(messages)

    def _take(self, timeout_s: float) -> list[Any]:
        """The records there are, waiting up to ``timeout_s`` for the first only (``consume(n, t)`` would wait
        for n records or the whole of t)."""
        first = self.consumer.poll(timeout_s)
        return [] if first is None else [first, *self.consumer.consume(CONSUME_AT_ONCE - 1, 0)]

    def versions(self) -> list[VersionInfo]:
        """The versions the topic holds whole, oldest first (collected ones included)."""
        return [self.store.info(v) for v in sorted(self.seen.done)]

    def _apply(self, messages: list[Any]) -> None:
        """Each record in turn; one that raises is counted and logged and costs only itself, never the records
        after it (a poisoned record must not hide a ``done`` or ``@current`` behind it)."""
        for msg in messages:
            if msg.error():
                continue
            try:
                self._apply_one(msg.key() or b"", msg.value(), msg.timestamp()[1])
            except Exception as exc:  # whatever one record breaks, the others still apply
                self._bad(msg, exc)

    def _bad(self, msg: Any, exc: Exception) -> None:
        self.bad_records += 1
        if isinstance(exc, MalformedKey) and msg.value() is not None:
            self.malformed.add(msg.key() or b"")
        log.warning("ignoring record at %s@%d of %.120r: %s", self.topic, msg.offset(), msg.key(), exc)

    def _apply_one(self, raw_key: bytes, value: bytes | None, ts_ms: int) -> None:
        try:
            key = raw_key.decode()
        except UnicodeDecodeError:
            raise MalformedKey("its key is not UTF-8") from None
        if key in POINTERS:
            body = json.loads(value) if value is not None else {}
            version = body.get("version")
            self.seen.pointers[key] = check_version_name(version) if version is not None else None
            self.seen.why[key] = body
            return
        try:
            version, upload, rest = parse_key(key)
        except MalformedKey:
            if value is None:  # a tombstone: gc's for a malformed record, or one of a key never used
                self.malformed.discard(raw_key)
                return
            raise
        self.seen.highest = max(self.seen.highest, int(version[1:]))
        if rest == ["done"] and value is not None:
            self._complete(Done.parse(version, upload, value))
        elif rest == ["collected"]:
            self._collected(version, upload)
        elif len(rest) == 2:
            self._track_chunk(version, upload, key, value is None, ts_ms)
            if value is not None:
                self._chunk(version, upload, rest[0], int(rest[1]), value)

    def _track_chunk(self, version: str, upload: str, key: str, tombstone: bool, ts_ms: int) -> None:
        """The chunk keys of each upload no ``done`` record completed yet (what gc removes of dead publishes)."""
        if (done := self.seen.done.get(version)) is not None and done.upload == upload:
            return
        chunks = self.strays.setdefault((version, upload), Strays())
        if tombstone:
            chunks.keys.discard(key)
        else:
            chunks.keys.add(key)
            chunks.last_ms = max(chunks.last_ms, ts_ms)

    def _chunk(self, version: str, upload: str, name: str, offset: int, data: bytes) -> None:
        held = self.uploads.get((version, upload))
        if version in self.seen.done or (held is not None and held.own) or (self.store.versions_dir / version).is_dir():
            return  # installed, ours, or already here (a restart, our own push): nothing to download
        if (version, upload) not in self.uploads:
            self.uploads[version, upload] = Upload(self.scratch / f"{version}-{upload}")
            self.uploads[version, upload].folder.mkdir(parents=True)
        held = self.uploads[version, upload]
        path = held.folder / name
        with open(path, "r+b" if path.exists() else "wb") as f:
            f.seek(offset)
            f.write(data)
        held.digests.add(name, offset, data)

    def _complete(self, done: Done) -> None:
        version = done.version
        if self.seen.first.setdefault(version, done.upload) != done.upload:
            self._second_upload(done)
            return
        if version in self.seen.done:
            return
        upload = self.uploads.pop((version, done.upload), None)
        try:
            if (self.store.versions_dir / version).is_dir():  # already here (our own push, a restart)
                try:
                    _check_files(self.store.files(version), done, version, upload.sent if upload else None)
                except ModelStoreError:
                    raise ModelStoreError(f"model version {version}: this host's store holds another {version} "
                                          f"(published here alone?); move {self.store.versions_dir / version} "
                                          "aside to take the topic's") from None
            elif upload is None:
                raise ModelStoreError(f"model version {version}: its chunks are missing (compacted away, or "
                                      "never written)")
            else:
                collected = len(done.files) == 2
                known = upload.sent if upload.own else upload.digests.known(done)
                checked = _check_files([upload.folder / f["name"] for f in done.files], done, version, known)
                self.store.install(upload.folder, version, collected=collected, verified=checked)
        except ModelStoreError as exc:
            if upload is not None and not (upload.folder / WEIGHTS).exists():  # gc'd and compacted: "collected"
                self.seen.refused[version] = str(exc)                         # follows; said if a pointer names it
            else:
                self._refuse(version, str(exc))
            if upload is not None and not upload.own:
                upload.done = done  # meta and vocab may serve a later "collected"
                self.uploads[version, done.upload] = upload
            return
        if upload is not None and not upload.own:
            shutil.rmtree(upload.folder, ignore_errors=True)  # installed (moved away) or not needed
        self.seen.done[version] = done
        self.strays.pop((version, done.upload), None)
        self.seen.refused.pop(version, None)

    def _second_upload(self, done: Done) -> None:
        """A ``done`` record under a number another upload's ``done`` claimed first: never installed, here or
        anywhere (every reader sees the same first), its chunks dropped here and left for gc."""
        version = done.version
        log.warning("model version %s was uploaded twice; the first complete upload (%s) is kept, upload %s is "
                    "ignored", version, self.seen.first[version], done.upload)
        self.strays.setdefault((version, done.upload), Strays()).keys.add(f"{version}/{done.upload}/done")
        held = self.uploads.pop((version, done.upload), None)
        if held is not None and not held.own:
            shutil.rmtree(held.folder, ignore_errors=True)

    def _collected(self, version: str, upload: str) -> None:
        self.seen.collected.add(version)
        if version in self.seen.done:
            self.store.collect(version)
            return
        held = self.uploads.pop((version, upload), None)  # a late reader: the weights' chunks are gone
        if held is None or held.done is None:
            return
        try:
            (held.folder / WEIGHTS).unlink(missing_ok=True)
            self.store.install(held.folder, version, collected=True)
            self.seen.refused.pop(version, None)
            self.seen.done[version] = held.done
        except ModelStoreError as exc:
            log.warning("collected model version %s: %s", version, exc)

    def _refuse(self, version: str, why: str) -> None:
        if self.seen.refused.get(version) != why:
            log.error("refused model version %s: %s", version, why)
            self.new_refusals.append((version, why))
        self.seen.refused[version] = why

    def _installed(self, version: str | None) -> bool:
        return version in self.seen.done and version not in self.seen.collected

    def _mirror(self) -> None:
        """The store's pointers as the topic says, once the versions they name are installed here: a pointer to a
        version that is not (refused, collected) leaves serving as it is, logged once."""
        serving, shadow = self.seen.serving(), self.seen.pointers["@shadow"]
        for version in (serving, shadow):
            if version is not None and not self._installed(version) and self._unserved != version:
                log.error("the topic names model version %s, which is not installed here (%s); serving stays as "
                          "it is", version, self.seen.refused.get(version, "collected or never received"))
                self._unserved = version
        if serving is not None and not self._installed(serving):
            return
        self.store.mirror(serving, self.seen.pointers["@pin"], shadow if self._installed(shadow) else None)

    # ----- writing -----------------------------------------------------------------------------------------------
    def publish(self, model: SeqRecModel, vocab: Vocabulary, metrics: dict[str, float] | None = None,
                parent: str | None = None, notes: dict[str, Any] | None = None, reason: str = "publish",
                make_current: bool = True) -> VersionInfo:
        """Publish a new version through the topic and (unless ``make_current`` is False) make it @current; returns
        its description once this host has it installed."""
        for _ in range(PUBLISH_TRIES):
            self.catch_up()
            version = self.store.next_version(above=self.seen.highest)
            folder, info = self.store.prepare(model, vocab, version, metrics, parent, notes)
            try:
                self._upload(version, [folder / name for name in FILES], folder)
            except VersionConflict as exc:
                log.warning("%s; publishing again under the next number", exc)
                continue
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            if make_current:
                self._point("@current", version, reason)
            return info
        raise VersionConflict(f"other publishers took {PUBLISH_TRIES} version numbers in a row; try again")

    def push(self, version: str, reason: str = "push") -> VersionInfo:
        """Publish a version this store already holds (e.g. trained offline without a broker) under its own number,
        and make it @current."""
        info = self.store.load(check_version_name(version)).info  # verified first
        self.catch_up()
        if version not in self.seen.done:
            if self.seen.highest >= int(version[1:]):
                raise ModelStoreError(f"the topic already uses number {version}; publish the model as a new version")
            try:
                self._upload(version, self.store.files(version), None)
            except VersionConflict as exc:
                raise VersionConflict(f"{exc}: this store's {version} is not the topic's and is not served; move "
                                      f"{self.store.versions_dir / version} aside and publish it as a new version"
                                      ) from None
        self._point("@current", version, reason)
        return info

    def pin(self, version: str, reason: str) -> VersionInfo:
        """Serve ``version`` (verified here first) and keep serving it while publishes go on (rollback, pin)."""
        self.catch_up()
        info = self._verified(version)
        value = self._pointer_value(version, reason)
        self._send([(b"@pin", value), (b"@current", value)])
        self.catch_up()
        return info

    def unpin(self) -> str | None:
        """Release the pin; the pinned version stays @current until the next publish. Returns it (None: none)."""
        self.catch_up()
        was = self.seen.pointers["@pin"]
        if was is not None:
            self._send([(b"@current", self._pointer_value(was, "unpin")), (b"@pin", None)])
            self.catch_up()
        return was

    def shadow(self, version: str | None) -> VersionInfo | None:
        """Have every worker score ``version`` (verified here first) beside the serving one; None stops it."""
        self.catch_up()
        info = self._verified(version) if version is not None else None
        self._send([(b"@shadow", self._pointer_value(version, "shadow") if version else None)])
        self.catch_up()
        return info

    def gc(self, keep: int) -> list[str]:
        """Remove the weights of every version but the newest ``keep`` and the serving, pinned and shadow ones,
        on every host: their chunks are tombstoned and a ``collected`` record tells readers. Returns them. The
        chunks of dead uploads and records with a malformed key go too (:meth:`_dead`; counted in
        ``strays_removed``)."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.catch_up()
        whole = sorted(v for v in self.seen.done if v not in self.seen.collected)
        spared = {*whole[-keep:], *self.seen.pointers.values()}
        gone = [v for v in whole if v not in spared]
        for version in gone:
            done = self.seen.done[version]
            tombstones: list[tuple[bytes, bytes | None]] = [
                (f"{version}/{done.upload}/{WEIGHTS}/{offset}".encode(), None) for offset in done.weights_chunks()]
            self._send([*tombstones, (f"{version}/{done.upload}/collected".encode(), b"{}")])
        dead = [key.encode() for (version, upload), strays in self.strays.items()
                if self._dead(version, upload, strays) for key in sorted(strays.keys)] + sorted(self.malformed)
        if dead:
            self._send([(key, None) for key in dead])
        self.strays_removed = len(dead)
        if gone or dead:
            self.catch_up()
        return gone

    def _dead(self, version: str, upload: str, strays: Strays) -> bool:
        """An upload that will never complete: another upload completed its number first, or it wrote nothing for
        STRAY_AGE_S while a higher number completed (a publisher numbers above what it read, so it died)."""
        if not strays.keys:
            return False
        if version in self.seen.first:  # the first upload is never dead, even where it was refused (this store
            return upload != self.seen.first[version]  # holds another version under its number)
        newest = max((int(v[1:]) for v in self.seen.done), default=0)
        return int(version[1:]) < newest and time.time() * 1000 - strays.last_ms > STRAY_AGE_S * 1000

    def _verified(self, version: str) -> VersionInfo:
        if check_version_name(version) not in self.seen.done:
            why = self.seen.refused.get(version, "it was never published")
            raise ModelStoreError(f"model version {version} is not on {self.topic}: {why}")
        return self.store.load(version).info

    def _point(self, pointer: str, version: str, reason: str) -> None:
        self._send([(pointer.encode(), self._pointer_value(version, reason))])
        self.catch_up()

    def _pointer_value(self, version: str, reason: str) -> bytes:
        return json.dumps({"version": version, "reason": reason, "by": self.who,
                           "ts": int(time.time() * 1000)}).encode()

    def _upload(self, version: str, paths: list[Path], own: Path | None) -> None:
        """The files' chunks, then ``done`` once they are all acknowledged; VersionConflict when another upload
        completed ``version`` first."""
        upload = uuid.uuid4().hex[:12]
        whole = hashlib.sha256()
        files, written = [], []
        for path in paths:
            digest = hashlib.sha256()
            written += self._send(_chunks(path, f"{version}/{upload}/{path.name}", digest, whole))
            files.append({"name": path.name, "size": path.stat().st_size, "sha256": digest.hexdigest()})
        sent = {**{f["name"]: f["sha256"] for f in files}, WHOLE: whole.hexdigest()}
        self.uploads[version, upload] = Upload(own or self.store.versions_dir / version, own=True, sent=sent)
        done = {"version": version, "upload": upload, "chunk_bytes": CHUNK_BYTES, "files": files,
                "sha256": whole.hexdigest(), "ts": int(time.time() * 1000), "by": self.who}
        self._skip_own(written)
        self._send([(f"{version}/{upload}/done".encode(), json.dumps(done).encode())])
        self.catch_up()
        if (first := self.seen.first.get(version)) != upload:
            self.uploads.pop((version, upload), None)
            raise VersionConflict(f"model version {version} was not taken: another upload ({first or 'unknown'}) "
                                  "completed it first")
        if version not in self.seen.done:
            raise VersionConflict(f"model version {version} was not taken: {self.seen.refused.get(version)}")

    def _send(self, records: Iterable[tuple[bytes, bytes | None]]) -> list[tuple[int, int]]:
        """Produce ``records`` and wait until each is acknowledged; returns where they were written, as
        (partition, offset), in acknowledgement order. At most PRODUCER_QUEUE_KB of them wait in the producer at
        a time, so a version of any size is sent with bounded memory."""
        from confluent_kafka import Producer

        if self._producer is None:
            # not idempotent: a retried chunk is the same key and bytes, and each step waits for the one before
            # (an idempotent producer's first flush waited ~0.5 s for its producer id)
            self._producer = Producer(producer_config(self.cfg, **{
                "acks": "all", "enable.idempotence": False, "compression.type": "none",
                "queue.buffering.max.kbytes": PRODUCER_QUEUE_KB, "logger": quiet_logger("lrustream.versions")}))
        deliveries, sent = _Written(), 0
        for key, value in records:
            produce(self._producer, self.topic, value, key, on_delivery=deliveries)
            sent += 1
        await_deliveries(self._producer, deliveries, f"{sent} records to {self.topic}", timeout_s=60.0)
        return deliveries.at

    def _skip_own(self, written: list[tuple[int, int]]) -> None:
        """Move the reader past the chunks it just wrote when they are the only records between its position and
        their end: this store holds those files already, and reading hundreds of MB back would delay ``done``'s
        catch-up, and so ``@current``. Records of anyone else in between: nothing is skipped."""
        from confluent_kafka import KafkaException, TopicPartition

        partitions = {p for p, _ in written}
        offsets = sorted(o for _, o in written)
        if len(partitions) != 1 or not offsets or offsets[-1] - offsets[0] + 1 != len(offsets):
            return
        tp = TopicPartition(self.topic, partitions.pop())
        try:
            if self.consumer.position([tp])[0].offset == offsets[0]:
                self.consumer.seek(TopicPartition(tp.topic, tp.partition, offsets[-1] + 1))
        except KafkaException as exc:  # reading them back is merely slower
            log.debug("reading our own chunks back: %s", exc)

    def __enter__(self) -> VersionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.consumer.close()
        if self._producer is not None:
            self._producer.flush(5)
        shutil.rmtree(self.scratch, ignore_errors=True)


def _check_files(paths: list[Path], done: Done, version: str, known: dict[str, str] | None = None) -> dict[str, str]:
    """Every file has the size and sha256 the ``done`` record names, and the whole its checksum (``paths`` may
    lack the weights: a version collected here); returns the checksums checked, by file name. ``known``: the
    sha256 of files (and, under :data:`WHOLE`, of the whole) computed from the very bytes written to them, as
    they were written (:class:`Digests`); every other file is read from disk."""
    known = known or {}
    entire = len(paths) == len(done.files)
    whole = hashlib.sha256() if done.sha256 and entire and WHOLE not in known else None
    checked = {}
    for path, expected in zip(paths, done.files[:len(paths)], strict=True):
        name = expected["name"]
        try:
            size = path.stat().st_size
            digest = known.get(name) if whole is None else None
            digest = digest or _file_sha256(path, whole)
        except OSError:
            raise ModelStoreError(f"model version {version}: {name} is missing") from None
        if size != expected["size"] or digest != expected["sha256"]:
            raise ModelStoreError(f"model version {version}: {name} is incomplete or corrupt "
                                  f"({size} of {expected['size']} bytes, checksum mismatch)")
        checked[name] = digest
    if done.sha256 and entire and (known.get(WHOLE) if whole is None else whole.hexdigest()) != done.sha256:
        raise ModelStoreError(f"model version {version}: the checksum of the whole version does not match")
    return checked


def _chunks(path: Path, prefix: str, *digests: Any) -> Iterator[tuple[bytes, bytes]]:
    """One file's chunk records, read as they are sent: ``prefix/offset`` -> at most CHUNK_BYTES of the file from
    ``offset`` on (one empty chunk for an empty file); every block also goes into each of ``digests``."""
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            for digest in digests:
                digest.update(block)
            yield f"{prefix}/{offset}".encode(), block
            offset += len(block)
    if offset == 0:
        yield f"{prefix}/0".encode(), b""


def _file_sha256(path: Path, whole: Any = None) -> str:
    """A file's sha256, read a block at a time; each block also goes into ``whole`` when given."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
            if whole is not None:
                whole.update(block)
    return digest.hexdigest()


class _Written(Deliveries):
    """Deliveries, and the (partition, offset) each acknowledged record was written at."""

    def __init__(self) -> None:
        super().__init__()
        self.at: list[tuple[int, int]] = []

    def __call__(self, err: Any, msg: Any) -> None:
        super().__call__(err, msg)
        if err is None:
            self.at.append((msg.partition(), msg.offset()))


def _remove_dead_scratch(root: Path) -> None:
    """Scratch folders of readers whose process is gone (a kill mid-download)."""
    for folder in root.glob(f"{SCRATCH}*") if root.is_dir() else []:
        try:
            os.kill(int(folder.name[len(SCRATCH):].split("-")[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError):  # not our name; or alive under another user
            continue


def publish_version(cfg: Config, model: SeqRecModel, vocab: Vocabulary, who: str = "lrustream",
                    **details: Any) -> VersionInfo:
    """Publish one version through the topic from this host's model store (``model_store.dir``) and make it
    @current (:meth:`VersionLog.publish`; ``details``: metrics, parent, notes, reason)."""
    with VersionLog(cfg, ModelStore(cfg.model_store.dir), who=who) as log:
        return log.publish(model, vocab, **details)
