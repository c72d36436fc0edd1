"""The per-micro-batch work of a streaming worker, independent of Kafka's consumer so it can be reasoned about and
tested.

For one micro-batch of raw input records (any users, any partitions) :meth:`Processor.apply`:

1. restores a partition's states from the changelog the first time it is seen since a rebalance;
2. guards against consumer skips (faust-streaming #596, kept for any consumer): if a partition's first offset is
   past the last applied offset + 1, the missing records are fetched directly from Kafka, in bounded chunks, and
   applied and committed first, chunk by chunk (all of them, or the batch fails);
3. skips records at or below the offset already applied (redelivery after a crash: never applied twice);
4. parses and validates each record; bad ones go to the dead-letter topic with a reason;
5. advances every user's state by all of its events in the batch with ONE batched ``model.steps`` call
   (exactly ``step`` per event, in offset order; padded to a fixed minimum of rows so a user's numbers never
   depend on how the stream was cut into batches); a state made by another model version is first
   re-derived from the user's stored item window with the serving model (``prefill``);
6. scores, filters items already in the user's window, and produces one recommendation per served event,
   without waiting for its acknowledgement; the new states are pending, in memory, where later batches read
   them.

7. :meth:`Processor.commit`, for everything applied since the last commit (stream/pipeline.py calls it on an
   interval), waits until the recommendations and dead letters are acknowledged, then commits the states
   (changelog, then local RocksDB). Only after ``commit`` returns may the input offsets up to the offsets it
   returns be committed. :meth:`Processor.process` is ``apply`` and ``commit`` together.

So after any crash every event yields at least one recommendation, and every state has applied every event
exactly once. A consumer that must not see repeats de-duplicates recommendations by
(``source.partition``, ``source.offset``), which is unique per input event.

Faults are of two kinds, and ``process`` tells them apart so that one record can never stall a partition:

- **A poison record** costs only itself. A record that cannot be parsed, mapped or scored is dead-lettered with
  its reason; when the batched model work raises, the batch's events are applied one at a time and only those
  that still raise are dead-lettered ("processing failed: ..."). A dead-letter copy keeps the original key,
  value, timestamp and headers; one too big for the dead-letter topic is written truncated, with headers that
  say so (``lrustream.truncated``, ``lrustream.original.size``, ``lrustream.original.sha256``).
- **An infrastructure fault** (outputs or changelog not acknowledged, disk errors) raises out of ``apply`` or
  ``commit`` with nothing committed; the caller discards what is pending and applies every event since the
  last commit again (stream/pipeline.py: bounded back-off, ``/health`` degraded,
  ``lrustream_batch_retries_total``). Those events' recommendations are emitted again: a consumer sees repeats
  only for them, with the same ``source`` (de-duplicated as above).
- **A partition that moved** while the batch was in flight (a rebalance) makes the changelog refuse the commit
  (``state.store.Fenced``: another worker has claimed the partition since, state/README.md); it is retried like
  an infrastructure fault, and the retry claims and restores the partition first, so it applies only what the
  new owner has not.

``stopping`` (set a grace period after SIGTERM, stream/worker.py) makes a commit that waits for acknowledgements
give up within half a second (:class:`Stopping`); nothing of it is committed, so it is redelivered to whoever
owns the partition next.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch
from confluent_kafka import KafkaError, KafkaException

from lrustream.kernel.config import StreamConfig, TopicsConfig
from lrustream.kernel.errors import LrustreamError
from lrustream.kernel.kafka import flush, produce
from models.base import padded_steps
from models.vocab import Vocabulary
from state.record import UserRecord, push_items
from state.store import Fenced, StateError, StateStore
from stream.events import BadEvent, Event, parse_event
from stream.examples import encode_example
from stream.metrics import WorkerMetrics
from stream.popular import Popularity
from stream.serving import Serving
from stream.shadow import Shadow

log = logging.getLogger("lrustream.worker")

DLQ_MAX_RECORD_BYTES = 990_000  # a dead-letter copy larger than this is truncated (the producer's limit: 1 MB)
DLQ_TRUNCATED_VALUE_BYTES = 65_536  # what a truncated copy keeps of the original value
DLQ_STUB_MAX_KEY_BYTES = 1_024  # a copy refused even truncated is sent again as headers only (and a short key)


class OutputError(LrustreamError):
    """Recommendations or dead letters were not acknowledged: an infrastructure fault, the batch is retried."""


class GapFillError(LrustreamError):
    """Skipped offsets could not all be fetched: an infrastructure fault, the batch is retried."""


class Stopping(LrustreamError):
    """The worker is stopping: the batch was abandoned before anything of it was committed."""


INFRASTRUCTURE_FAULTS = (OutputError, GapFillError, Stopping, StateError, OSError, MemoryError)


@dataclass(slots=True)
class Input:
    """One raw input record as the consumer delivered it."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None
    headers: list[tuple[str, bytes]] | None = None
    received_ms: int | None = None  # when the consumer handed it to the worker (the queueing/processing split)


@dataclass(slots=True)
class _Served:
    """An event ready to be applied: parsed, deduplicated, item mapped."""

    inp: Input
    event: Event
    item: int  # internal id (OOV row for unknown items under the "oov" policy)
    unknown: str | None  # the external id when the vocabulary lacks it


@dataclass(frozen=True, slots=True)
class _Answer:
    """The recommendation served for a user's last event, kept for requests (:meth:`Processor.recommend`)."""

    offset: int  # the event's input offset
    version: str  # the model version that scored it
    catalogue: int  # Processor._catalogue when it was scored (a block since may remove one of its items)
    hidden: bytes  # the top-layer output it scored (the user's record keeps the same bytes)
    items: list[str]
    scores: list[float]


@dataclass
class BatchResult:
    served: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    gap_filled: int = 0
    rederived: int = 0


Fetch = Callable[[int, int, int], Iterable[list[Input]]]
"""(partition, first, last), offsets inclusive -> the records in that range, in order, in bounded chunks; it
raises :class:`GapFillError` rather than yield less than the whole range."""


class Processor:
    """Applies micro-batches. Single-threaded: call ``process`` and ``swap`` from one thread at a time."""

    def __init__(self, serving: Serving | None, store: StateStore, producer: Any, *, stream: StreamConfig,
                 topics: TopicsConfig, state_dtype: str, fetch: Fetch | None = None,
                 metrics: WorkerMetrics | None = None, vocab_of: Callable[[str], Vocabulary] | None = None) -> None:
        """``stream`` and ``topics`` are the config's sections, ``state_dtype`` is ``state.dtype``; without
        ``fetch`` skipped offsets are not filled (step 2). ``serving`` None: no version yet (a worker waiting
        for its first model); nothing may be processed or answered until :meth:`swap` gives one."""
        self.serving: Serving = serving  # type: ignore[assignment]  # None only until the first swap
        self.store = store
        self.producer = producer
        self.stream = stream
        self.topics = topics
        self.state_dtype = state_dtype
        self.fetch = fetch
        self.metrics = metrics or WorkerMetrics()
        self.vocab_of = vocab_of  # a version's vocabulary: ids in windows stored under it mean its items
        if serving is not None:
            self.metrics.set_version(serving.version, serving.index)
        self.stopping = threading.Event()  # set from another thread: abandon the batch in hand (see Stopping)
        self._errors: list[str] = []  # delivery failures of outputs produced since the last commit
        self._refused_too_large: list[tuple[Input, str]] = []  # dead letters the DLQ topic refused as too big
        # applied and not committed yet: partition -> (records by user, highest input offset)
        self._pending: dict[int, tuple[dict[str, UserRecord], int]] = {}
        # the cold-start fallback: the events applied, on a seed from the serving version's training data
        self.popular = Popularity(stream.popular_half_life_s)
        if serving is not None:
            self.popular.seed(*serving.popular_ids())
        self.shadow: Shadow | None = None  # a candidate version scored beside the serving one (stream/shadow.py)
        self.blocked: frozenset[str] = frozenset()  # items never to recommend (stream/catalogue.py)
        self._blocked_columns: torch.Tensor | None = None  # their columns in the serving vocabulary
        self._catalogue = 0  # how many times the blocked items changed (an answer kept before may hold one)
        # per (partition, user), the answer of the user's last event, for requests (recommend), at most
        # stream.answer_cache_users of them, the most recently served last
        self._answers: OrderedDict[tuple[int, str], _Answer] = OrderedDict()
        # per (partition, user) of the batch in hand: version -> [events scored, hits] (_score_live)
        self._live: dict[tuple[int, str], dict[str, list[int]]] = {}

    # ----- model swap, catalogue --------------------------------------------------------------------------------
    def swap(self, serving: Serving) -> None:
        """Serve another version from the next micro-batch on (states are re-derived lazily, per user)."""
        self.serving = serving
        self.metrics.set_version(serving.version, serving.index)
        self._blocked_columns = self._columns(self.blocked)
        self.popular.seed(*serving.popular_ids())  # a version without a popularity note clears the seed

    def set_shadow(self, candidate: Serving | None) -> None:
        """From the next micro-batch on, score every event with ``candidate`` too, off the output path
        (stream/shadow.py); None stops it."""
        self.shadow = None if candidate is None else Shadow(candidate)
        self.metrics.set_shadow(None)

    def block(self, items: frozenset[str]) -> None:
        """From the next micro-batch on, recommend none of ``items`` (and every other item again)."""
        self._catalogue += 1  # first: a request that sees the new columns never takes an answer kept before them
        self.blocked = items
        self._blocked_columns = self._columns(items)

    def _columns(self, items: frozenset[str]) -> torch.Tensor | None:
        """The score columns of ``items`` that the serving vocabulary knows (internal id = column)."""
        if self.serving is None:
            return None  # no version yet: the first swap computes them
        vocab = self.serving.vocab
        ids = sorted(i for item in items if (i := vocab.get(item)) is not None and 0 < i <= self.serving.num_items)
        return torch.tensor(ids, dtype=torch.long) if ids else None

    # ----- requests (any thread) ---------------------------------------------------------------------------------
    def lookup(self, p: int, user: str) -> UserRecord | None:
        """The user's latest record: applied, or committed (None: no state). Safe from any thread: a batch
        replaces a record rather than change it, so a reader sees one record whole; the newest applied one may
        still be discarded by a failed commit (stream/pipeline.py). Raises state.store.NotReady for a partition
        not restored here since the last rebalance."""
        pending = self._pending.get(p)
        if pending is not None and (record := pending[0].get(user)) is not None:
            return record
        return self.store.read(p, user)

    def recommend(self, p: int, user: str, k: int, exclude: Iterable[str] = ()) -> dict[str, Any]:
        """A user's top-``k`` now, without advancing the state (stream/README.md, "Requests"): the record's
        last top-layer output scored as the user's last event was (so the answer equals that event's
        recommendation when nothing changed since), minus ``exclude`` (external ids), the blocked items and, with
        ``stream.exclude_seen``, the window; the popular fallback for a user without state or without a known
        item in its window. Any thread (reads only)."""
        serving, blocked, catalogue = self.serving, self._blocked_columns, self._catalogue  # one view throughout
        record = self.lookup(p, user)
        now_ms = int(time.time() * 1000)
        if record is not None:
            record = self._current(record, serving)
        excluded = [i for x in exclude if (i := serving.vocab.get(x)) is not None and 0 < i <= serving.num_items]
        seen = np.zeros(0, dtype=np.int32) if record is None else _known_ids(record.window, serving.num_items)
        out: dict[str, Any] = {"user_id": user, "items": [], "scores": [], "model_version": serving.version,
                               "source": "request", "partition": p, "event_id": None, "event_ts": None,
                               "kafka_ts": None, "received_ts": now_ms, "emitted_ts": now_ms}
        if not len(seen):  # no state, or no item the model knows in its window
            out["items"], out["scores"] = self.popular_top(k, excluded)
            out["fallback"] = "popular"
            return out
        if (kept := self._kept_answer(p, user, record, k, excluded, serving, catalogue)) is not None:
            out["items"], out["scores"] = list(kept.items), list(kept.scores)
            return out
        masked = torch.tensor(_with_blocked(excluded, blocked), dtype=torch.long)
        with torch.inference_mode():
            h = self._hidden(record, serving)
            windows = torch.from_numpy(seen.astype(np.int64)[None]) if self.stream.exclude_seen else None
            (out["items"], out["scores"]), = serving.top(h[None], windows, k, self.stream.min_step_rows,
                                                         masked if len(masked) else None)
        return out

    def _kept_answer(self, p: int, user: str, record: UserRecord, k: int, excluded: list[int], serving: Serving,
                     catalogue: int) -> _Answer | None:
        """The answer kept from the user's last event when scoring the record now would give exactly it: the
        same event, version, top-layer output and blocked items, the default ``k`` and no exclusions. Scoring
        a stored output is one product with the whole item table (about a millisecond on the 2-core machine,
        most of a request's time in the worker); this is a dictionary look-up."""
        if excluded or k != self.stream.top_k:
            return None
        kept = self._answers.get((p, user))
        if (kept is None or kept.offset != record.offset or kept.version != serving.version
                or kept.catalogue != catalogue or kept.hidden != record.hidden):
            return None
        return kept

    def _keep_answers(self, users: list[tuple[int, str]], per_user: dict[tuple[int, str], list[_Served]],
                      outputs: list[dict[str, Any]], hiddens: list[bytes]) -> None:
        """Keep each user's last answer of the batch for requests (``outputs`` user by user, as ``_rank`` made
        them); a popular fallback is not kept (the popularity moves on)."""
        limit = self.stream.answer_cache_users
        if not limit:
            return
        answers, row = self._answers, -1
        for u, hidden in zip(users, hiddens, strict=True):
            row += len(per_user[u])
            out = outputs[row]
            if "fallback" in out:
                answers.pop(u, None)
                continue
            answers[u] = _Answer(out["source"]["offset"], out["model_version"], self._catalogue, hidden,
                                 out["items"], out["scores"])
            answers.move_to_end(u)
        while len(answers) > limit:
            answers.popitem(last=False)

    def _current(self, record: UserRecord, serving: Serving) -> UserRecord:
        """The record as ``serving`` sees it: a copy re-derived from its window when another version made it."""
        if record.version == serving.version:
            return record
        record = dataclasses.replace(record)
        self._rederive([record], serving)
        return record

    def _hidden(self, record: UserRecord, serving: Serving) -> torch.Tensor:
        """The top-layer output after the user's last event: stored with the record, or (a record re-derived,
        or written before the record kept it) the model's steps over the window from a fresh state."""
        model = serving.model
        if (stored := _stored_hidden(record, model.d_model)) is not None:
            return stored
        items = torch.from_numpy(np.where(record.window > 0, record.window, model.oov_index).astype(np.int64))
        _, hidden = padded_steps(model, model.init_state(1), items[None], self.stream.min_step_rows)
        return hidden[0, -1]

    # ----- one micro-batch --------------------------------------------------------------------------------------
    def process(self, batch: list[Input]) -> BatchResult:
        """Apply ``batch`` and commit it (with whatever was applied before and not committed yet); on failure
        nothing of it is committed, and the next call starts from the committed states."""
        try:
            result = self.apply(batch)
            self.commit()
        except BaseException:
            self.discard()
            raise
        return result

    def apply(self, batch: list[Input]) -> BatchResult:
        """Steps 1-6: advance the states and produce the outputs without waiting for acknowledgements. The new
        states are pending (read by the next batches, never by anyone else) until :meth:`commit`."""
        result = BatchResult()
        for p in sorted({i.partition for i in batch}):
            self.store.ensure_ready(p)
            self._fill_gap(p, min(i.offset for i in batch if i.partition == p), result)
        outputs = self._apply_batch(batch, result)
        self.producer.poll(0)  # serve delivery reports as they come, so the producer's queue never fills with them
        self._observe(batch, result, outputs)
        return result

    def warm_up(self) -> None:
        """One batch's model work on nothing (no state read or written): the first call of each kernel costs
        far more than the next, and would otherwise land on the first events."""
        model, rows = self.serving.model, self.stream.min_step_rows
        with torch.inference_mode():
            _, hidden = padded_steps(model, model.init_state(rows), torch.ones(rows, 2, dtype=torch.long), rows)
            torch.topk(model.score(hidden[:, -1]), min(self.stream.top_k, self.serving.num_items), dim=1)

    @property
    def pending(self) -> bool:
        """Whether anything was applied and not committed yet."""
        return bool(self._pending)

    def commit(self) -> dict[int, int]:
        """Step 7 for everything applied since the last commit: wait until its outputs are acknowledged, then
        commit its states and applied-offset markers (state/README.md). Returns, per partition, the highest input
        offset now committed: the input offsets up to it may be committed to the consumer group. On failure
        nothing is committed, and :meth:`discard` must be called before anything else."""
        if not self._pending:
            return {}
        self._settle_outputs()
        pending, applied = self._pending, {p: offset for p, (_, offset) in self._pending.items()}
        try:
            self.store.commit(pending)
        except Fenced as exc:  # counted here: the caller may be gone by now (a rebalance cancels a batch)
            self.metrics.fenced.inc()
            log.warning("%s; nothing of this batch is committed here", exc)
            raise
        self._pending = {}
        return applied

    def discard(self) -> None:
        """Forget what was applied and not committed (after a failed apply or commit, or a lost partition): the
        next batch reads the committed states; the inputs are applied again (redelivered or retried)."""
        self._pending = {}
        self._errors = []
        self._refused_too_large = []

    def _applied(self, p: int) -> int:
        """The highest input offset of partition ``p`` applied so far, committed or not."""
        if p in self._pending:
            return self._pending[p][1]
        return self.store.applied_offset(p)

    def _get(self, p: int, user: str) -> UserRecord | None:
        if p in self._pending and (record := self._pending[p][0].get(user)) is not None:
            return record
        return self.store.get(p, user)

    def _fill_gap(self, p: int, first: int, result: BatchResult) -> None:
        """Apply the offsets the consumer skipped (faust-streaming #596) between partition ``p``'s applied marker
        and ``first``: fetched directly, in bounded chunks, each applied and committed like a micro-batch. ``fetch``
        yields the whole range or raises (GapFillError), so the marker never passes an offset not applied."""
        applied = self._applied(p)
        if applied < 0 or first <= applied + 1 or self.fetch is None:
            return
        log.warning("partition %d: consumer skipped offsets %d..%d; fetching them directly", p, applied + 1,
                    first - 1)
        for chunk in self.fetch(p, applied + 1, first - 1):
            result.gap_filled += len(chunk)
            self._apply_batch(chunk, result)
            self.commit()

    def _apply_batch(self, batch: list[Input], result: BatchResult) -> list[dict[str, Any]]:
        """Steps 3-6 for records whose partitions are ready and gap-free; returns the recommendations emitted."""
        by_part: dict[int, list[Input]] = {}
        for inp in batch:
            by_part.setdefault(inp.partition, []).append(inp)
        applied = {p: self._applied(p) for p in by_part}
        todo = [i for p, inputs in sorted(by_part.items()) for i in sorted(inputs, key=lambda i: i.offset)
                if i.offset > applied[p]]
        result.skipped += len(batch) - len(todo)
        self._live = {}
        dead: list[tuple[Input, str]] = []
        served = self._parse(todo, dead)
        records, outputs = self._apply_isolating(served, result, dead)
        self._count_live()
        if self.stream.emit_training_examples:
            self._examples(records, outputs)
        self._emit(outputs, dead)
        for p, inputs in by_part.items():
            pending, _ = self._pending.get(p, ({}, -1))
            self._pending[p] = (pending, max([applied[p], *(i.offset for i in inputs)]))
        for (p, user), record in records.items():
            self._pending[p][0][user] = record
        result.served += len(outputs)
        result.dead_lettered += len(dead)
        return outputs

    def _parse(self, inputs: list[Input], dead: list[tuple[Input, str]]) -> list[_Served]:
        vocab, n = self.serving.vocab, self.serving.num_items
        oov = self.serving.model.oov_index
        served = []
        for inp in inputs:
            try:
                event = parse_event(inp.value, inp.key, inp.timestamp_ms, self.stream.max_value_bytes)
                idx = vocab.get(event.item_id)
            except BadEvent as exc:
                dead.append((inp, str(exc)))
                continue
            except Exception as exc:  # parse_event promises BadEvent only; a record must never fail its batch
                dead.append((inp, _failure("unreadable record", exc)))
                continue
            if idx is not None and idx <= n:
                served.append(_Served(inp, event, idx, None))
            elif self.stream.unknown_items == "oov":
                served.append(_Served(inp, event, oov, event.item_id))
            else:
                dead.append((inp, f"unknown item: {event.item_id[:64]}"))
        return served

    # ----- the model work -----------------------------------------------------------------------------------
    def _apply_isolating(self, served: list[_Served], result: BatchResult, dead: list[tuple[Input, str]]
                         ) -> tuple[dict[tuple[int, str], UserRecord], list[dict[str, Any]]]:
        """``_apply`` on the whole batch; if its model work raises (not an infrastructure fault), the events one
        at a time in offset order, each from the state the previous ones left, dead-lettering those that raise.
        Padded steps make a user's numbers the same either way."""
        counts = (result.skipped, result.rederived)
        try:
            return self._apply(served, result)
        except INFRASTRUCTURE_FAULTS:
            raise
        except Exception as exc:
            log.error("model work of a micro-batch failed (%s: %s); applying its %d events one by one",
                      type(exc).__name__, exc, len(served))
        result.skipped, result.rederived = counts
        self._live = {}
        records: dict[tuple[int, str], UserRecord] = {}
        outputs: list[dict[str, Any]] = []
        for s in served:
            try:
                advanced, out = self._apply([s], result, records)
            except INFRASTRUCTURE_FAULTS:
                raise
            except Exception as exc:
                dead.append((s.inp, _failure("processing failed", exc)))
                continue
            records.update(advanced)
            outputs += out
        return records, outputs

    def _apply(self, served: list[_Served], result: BatchResult,
               known: dict[tuple[int, str], UserRecord] | None = None
               ) -> tuple[dict[tuple[int, str], UserRecord], list[dict[str, Any]]]:
        """Advance and score; ``known`` holds records already advanced in this batch (else the store's)."""
        per_user: dict[tuple[int, str], list[_Served]] = {}
        for s in served:
            per_user.setdefault((s.inp.partition, s.event.user_id), []).append(s)
        records = self._load(per_user, result, known or {})
        for u, evs in list(per_user.items()):  # per-user guard: an offset at or below the record's is never re-applied
            fresh = [s for s in evs if s.inp.offset > records[u].offset]
            result.skipped += len(evs) - len(fresh)
            if fresh:
                per_user[u] = fresh
            else:
                del per_user[u]
        if not per_user:
            return {}, []
        with torch.inference_mode():
            return self._advance(per_user, records)

    def _load(self, per_user: dict[tuple[int, str], list[_Served]], result: BatchResult,
              known: dict[tuple[int, str], UserRecord]) -> dict[tuple[int, str], UserRecord]:
        """Current records of the batch's users: stored, fresh (new user) or re-derived (other version)."""
        model, version = self.serving.model, self.serving.version
        records: dict[tuple[int, str], UserRecord] = {}
        stale: list[tuple[int, str]] = []
        for (p, user) in per_user:
            record = known[(p, user)] if (p, user) in known else self._get(p, user)
            if record is None:
                blob = model.state_to_bytes(model.init_state(1), self.state_dtype)[0]
                record = UserRecord(blob, version)
            elif record.version != version:
                stale.append((p, user))
                record = dataclasses.replace(record)  # re-derived below: readers on other threads keep the old one
            records[(p, user)] = record
        if stale:
            self._rederive([records[u] for u in stale])
            result.rederived += len(stale)
        return records

    def _rederive(self, stale: list[UserRecord], serving: Serving | None = None) -> None:
        """Replace states made by another model version with the serving model's parallel read of the window."""
        serving = serving or self.serving
        model = serving.model
        L = max(1, max(len(r.window) for r in stale))
        items = torch.zeros(len(stale), L, dtype=torch.long)
        for row, record in enumerate(stale):
            ext = record.external_window(self._vocab_for(record.version).item_of)
            known = [idx if (idx := serving.vocab.get(x)) and idx <= serving.num_items else x for x in ext]
            window, unknown = push_items(np.zeros(0, dtype=np.int32), [], known, model.max_len)
            if len(window):
                items[row, L - len(window):] = serving.internal_ids(ext[-len(window):])
            record.window, record.unknown = window, unknown
        with torch.inference_mode():
            state = model.prefill(items)
        for record, blob in zip(stale, model.state_to_bytes(state, self.state_dtype), strict=True):
            record.state, record.version, record.hidden = blob, serving.version, b""

    def _vocab_for(self, version: str) -> Vocabulary:
        """The vocabulary ids stored under ``version`` refer to. Vocabularies only append, so the serving one
        maps ids of older versions; after a rollback the window may hold ids only the newer version knows."""
        if self.vocab_of is None or version == self.serving.version:
            return self.serving.vocab
        return self.vocab_of(version)

    def _advance(self, per_user: dict[tuple[int, str], list[_Served]], records: dict[tuple[int, str], UserRecord]
                 ) -> tuple[dict[tuple[int, str], UserRecord], list[dict[str, Any]]]:
        """ONE batched ``steps`` call advances every user by all of its events in the batch (in offset order),
        then ONE scoring pass ranks items for every served event."""
        model = self.serving.model
        t0 = time.perf_counter()
        users = list(per_user)
        state = model.state_from_bytes([records[u].state for u in users], self.state_dtype)
        k = max(len(per_user[u]) for u in users)
        items = torch.zeros(len(users), k, dtype=torch.long)
        for row, u in enumerate(users):
            items[row, : len(per_user[u])] = torch.tensor([s.item for s in per_user[u]])
        state, hidden = padded_steps(model, state, items, self.stream.min_step_rows)
        order = [(i, j) for i, u in enumerate(users) for j in range(len(per_user[u]))]
        h_all = hidden[items > 0]  # [E, d], user by user, each user's events in order
        self.popular.observe(np.array([s.item for evs in per_user.values() for s in evs if s.unknown is None],
                                      dtype=np.int64))
        windows = self._seen_windows(users, per_user, records, order)
        outputs = self._rank(h_all, windows, [per_user[users[i]][j] for i, j in order], _cold(users, per_user, records))
        if self.shadow is not None:
            self._observe_shadow(users, per_user, records, hidden, order)
        self._score_live(users, per_user, records, outputs)
        blobs = model.state_to_bytes(state, self.state_dtype)
        last = hidden[torch.arange(len(users)), torch.tensor([len(per_user[u]) - 1 for u in users])]
        hiddens = [row.tobytes() for row in last.numpy().astype(np.float32, copy=False)]
        self._keep_answers(users, per_user, outputs, hiddens)
        now_ms = int(time.time() * 1000)
        advanced = {}
        for u, blob, last_hidden in zip(users, blobs, hiddens, strict=True):
            record, evs = records[u], per_user[u]
            window, unknown = self._pushed(record, evs)  # a new record: readers on other threads see old or new
            advanced[u] = UserRecord(blob, record.version, window, unknown, evs[-1].inp.partition,
                                     evs[-1].inp.offset, now_ms, last_hidden)
        self.metrics.step_latency.observe(time.perf_counter() - t0)
        return advanced, outputs

    def _score_live(self, users: list[tuple[int, str]], per_user: dict[tuple[int, str], list[_Served]],
                    records: dict[tuple[int, str], UserRecord], outputs: list[dict[str, Any]]) -> None:
        """The live hit rate of what was served: each event against the recommendation served for the user's event
        before it (the answer kept for the user's last event, or this batch's answer to the event before it),
        counted per version that served that recommendation. A user whose last answer is not kept (beyond
        ``stream.answer_cache_users``, a popular fallback, a restart) has nothing to score its first event against.
        Run before the batch's answers are kept."""
        k, row = self.stream.top_k, 0
        for u in users:
            kept = self._answers.get(u)
            before = (kept.items, kept.version) if kept is not None and kept.offset == records[u].offset else None
            for s in per_user[u]:
                if before is not None:
                    tally = self._live.setdefault(u, {}).setdefault(before[1], [0, 0])
                    hit = s.event.item_id in before[0][:k]
                    tally[0] += 1
                    tally[1] += hit
                out = outputs[row]
                row += 1
                before = None if "fallback" in out else (out["items"], out["model_version"])

    def _count_live(self) -> None:
        """The batch's live scores into the worker's counters, once the batch's model work is done."""
        totals: Counter[str] = Counter()
        hits: Counter[str] = Counter()
        for tallies in self._live.values():
            for version, (n, h) in tallies.items():
                totals[version] += n
                hits[version] += h
        for version, n in totals.items():
            self.metrics.live_events.labels(version=version).inc(n)
            self.metrics.live_hits.labels(version=version).inc(hits[version])

    def _observe_shadow(self, users: list[tuple[int, str]], per_user: dict[tuple[int, str], list[_Served]],
                        records: dict[tuple[int, str], UserRecord], hidden: torch.Tensor,
                        order: list[tuple[int, int]]) -> None:
        """Shadow scoring of the batch (stream/shadow.py) from the records before it and the serving version's
        outputs; it never fails the batch: an error stops shadowing (logged) and serving goes on unchanged."""
        shadow, live = self.shadow, self.serving
        assert shadow is not None
        try:
            live_prev = [[_stored_hidden(records[u], live.model.d_model),
                          *(hidden[row, j] for j in range(len(per_user[u]) - 1))] for row, u in enumerate(users)]
            tally = shadow.observe(
                live, users, [records[u].offset for u in users],
                [records[u].external_window(live.vocab.item_of) for u in users],
                [[(s.item if s.unknown is None else 0, s.event.item_id, s.inp.offset) for s in per_user[u]]
                 for u in users],
                live_prev, self._seen_windows(users, per_user, records, order, before=True), self.stream.top_k,
                self.stream.min_step_rows)
            self.metrics.set_shadow(tally)
        except Exception as exc:
            log.error("shadow scoring of %s failed (%s: %s); shadowing stopped, serving goes on unchanged",
                      shadow.version, type(exc).__name__, exc, exc_info=True)
            self.shadow = None

    def _seen_windows(self, users: list[tuple[int, str]], per_user: dict[tuple[int, str], list[_Served]],
                      records: dict[tuple[int, str], UserRecord], order: list[tuple[int, int]],
                      before: bool = False) -> torch.Tensor:
        """[E, max_len] item ids each event's recommendation must exclude: the user's window up to the event
        (``before``: up to the event before it, what the prediction of the event excluded)."""
        L, n_items = self.serving.model.max_len, self.serving.num_items
        items, first = [], []  # per user: its window and new items (no column: 0), where its first event's window ends
        for u in users:
            window = records[u].window
            full = np.concatenate([window, np.array([s.item for s in per_user[u]])]).astype(np.int64)
            full[(full < 0) | (full > n_items)] = 0  # unknown items have no column
            items.append(full)
            first.append(len(window) + (0 if before else 1))
        rows = np.zeros((len(order), L), dtype=np.int64)  # left-padded with 0 (the padding column)
        for row, (i, j) in enumerate(order):
            end = first[i] + j
            seen = items[i][max(0, end - L):end]
            rows[row, L - len(seen):] = seen
        return torch.from_numpy(rows)

    def _rank(self, h: torch.Tensor, windows: torch.Tensor, events: list[_Served], cold: list[bool]
              ) -> list[dict[str, Any]]:
        """One recommendation per event: the model's top-K, or the popular fallback for an event whose user's
        window holds no item the model knows (``cold``)."""
        serving = self.serving
        top = serving.top(h, windows if self.stream.exclude_seen else None, self.stream.top_k,
                          self.stream.min_step_rows, self._blocked_columns)
        popular = self.popular_top(self.stream.top_k, ()) if any(cold) else None
        outputs = []
        for s, (items, scores), fallback in zip(events, top, cold, strict=True):
            out = {
                "user_id": s.event.user_id,
                "items": items,
                "scores": scores,
                "model_version": serving.version,
                "source": {"partition": s.inp.partition, "offset": s.inp.offset},
                "event_id": s.event.event_id,
                "event_ts": s.event.ts,
                "kafka_ts": s.inp.timestamp_ms,
                "received_ts": s.inp.received_ms,
                "emitted_ts": 0,
            }
            if fallback:
                out["items"], out["scores"] = popular
                out["fallback"] = "popular"
            outputs.append(out)
        return outputs

    def popular_top(self, k: int, excluded: Iterable[int]) -> tuple[list[str], list[float]]:
        """The popular fallback (stream/popular.py): the ``k`` most popular items the serving vocabulary knows,
        none blocked nor in ``excluded`` (internal ids)."""
        serving = self.serving
        masked = np.array(_with_blocked(excluded, self._blocked_columns), dtype=np.int64)
        ids, weights = self.popular.top(k, serving.num_items, masked)
        return serving.vocab.items_of(ids), [round(w, 6) for w in weights]

    def _pushed(self, record: UserRecord, evs: list[_Served]) -> tuple[np.ndarray, list[str]]:
        """The record's window after this batch's events."""
        return push_items(record.window, record.unknown, [s.unknown if s.unknown is not None else s.item for s in evs],
                          self.serving.model.max_len)

    def _examples(self, records: dict[tuple[int, str], UserRecord], outputs: list[dict[str, Any]]) -> None:
        """Each served user's window (external ids) for the trainer's replay buffer: one record per user per
        batch, with how many of its items are new and how they scored against what was served (``_score_live``).
        Produced with the recommendations, before the commit."""
        new: dict[tuple[int, str], int] = {}
        for out in outputs:
            key = (out["source"]["partition"], out["user_id"])
            new[key] = new.get(key, 0) + 1
        item_of = self.serving.vocab.item_of
        for key, count in new.items():
            self._produce(self.topics.training_examples,
                          *encode_example(key[1], records[key].external_window(item_of), count, self._live.get(key)),
                          None)

    # ----- output -----------------------------------------------------------------------------------------------
    def _emit(self, outputs: list[dict[str, Any]], dead: list[tuple[Input, str]]) -> None:
        """Produce recommendations and dead letters (acknowledged by the next :meth:`commit`)."""
        now = int(time.time() * 1000)
        for out in outputs:
            out["emitted_ts"] = now
            self._produce(self.topics.recommendations, out["user_id"].encode(), _json(out), None,
                          on_delivery=self._recommendation_delivered)
        for inp, reason in dead:
            self._dead_letter(inp, reason, DLQ_MAX_RECORD_BYTES)
            self.metrics.dlq.labels(reason=reason.split(":")[0]).inc()

    def _settle_outputs(self) -> None:
        """Wait until every output produced so far is acknowledged; dead letters the topic refused as too large
        are sent again as headers only."""
        self._await_acks()
        refused, self._refused_too_large = self._refused_too_large, []
        for inp, reason in refused:  # the topic's own limit is lower than ours: headers only
            self._dead_letter(inp, reason, 0)
        if refused:
            self._await_acks()

    def _dead_letter(self, inp: Input, reason: str, max_bytes: int) -> None:
        """Send a refused record's copy; one refused by the producer or the topic as too large is sent again with
        ``max_bytes=0`` (headers only)."""
        key, value, headers = dead_letter_copy(inp, reason, self.topics.interactions, max_bytes)
        on_delivery = functools.partial(self._dead_letter_delivered, inp, reason, max_bytes > 0)
        try:
            self._produce(self.topics.dlq, key, value, headers, inp.timestamp_ms, on_delivery)
        except KafkaException as exc:
            if max_bytes == 0 or exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                raise OutputError(f"dead letter not produced: {exc}") from exc
            self._dead_letter(inp, reason, 0)

    def _dead_letter_delivered(self, inp: Input, reason: str, may_shrink: bool, err: Any, msg: Any) -> None:
        if err is not None and may_shrink and err.code() in (KafkaError.MSG_SIZE_TOO_LARGE,
                                                             KafkaError.RECORD_LIST_TOO_LARGE):
            self._refused_too_large.append((inp, reason))
        else:
            self._delivered(err, msg)

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Any,
                 timestamp_ms: int | None = None, on_delivery: Callable[[Any, Any], None] | None = None) -> None:
        produce(self.producer, topic, value, key, headers=headers, timestamp_ms=timestamp_ms,
                on_delivery=on_delivery or self._delivered, before_wait=self._stop_waiting)

    def _stop_waiting(self) -> None:
        if self.stopping.is_set():
            raise Stopping("stopping while the producer queue was full")

    def _stop_flushing(self, pending: int) -> None:
        if self.stopping.is_set():
            raise Stopping(f"stopping with {pending} records not acknowledged")

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def _recommendation_delivered(self, err: Any, msg: Any) -> None:
        """:meth:`_delivered`, and the time from produce to acknowledgement goes to the ack histogram."""
        self._delivered(err, msg)
        if err is None and msg is not None and (latency_s := msg.latency()) is not None:
            self.metrics.ack_latency.observe(latency_s)

    def _await_acks(self, timeout_s: float = 60.0) -> None:
        """Wait (in half-second slices, so a stop is seen) until every record produced so far is acknowledged."""
        if remaining := flush(self.producer, timeout_s, before_wait=self._stop_flushing):
            self._errors.append(f"{remaining} records still pending after {timeout_s:.0f} s")
        if self._errors:
            raise OutputError(f"output not acknowledged ({self._errors[0]}); the batch will be retried")

    def _observe(self, batch: list[Input], result: BatchResult, outputs: list[dict[str, Any]]) -> None:
        m = self.metrics
        m.events.inc(len(batch) + result.gap_filled)
        m.recommendations.inc(result.served)
        m.skipped.inc(result.skipped)
        m.gap_filled.inc(result.gap_filled)
        m.rederived.inc(result.rederived)
        m.batch_size.observe(len(batch))
        m.observe_rate(len(batch))
        for out in outputs:
            if out["kafka_ts"]:
                m.e2r_latency.observe(max(0.0, (out["emitted_ts"] - out["kafka_ts"]) / 1000))


def _stored_hidden(record: UserRecord, d_model: int) -> torch.Tensor | None:
    """The top-layer output the record keeps (None: none, or not one of a ``d_model`` model)."""
    if len(record.hidden) != 4 * d_model:
        return None
    return torch.from_numpy(np.frombuffer(record.hidden, dtype=np.float32).copy())


def _with_blocked(excluded: Iterable[int], blocked: torch.Tensor | None) -> list[int]:
    """``excluded`` internal ids and the blocked columns, each once, in order."""
    return sorted({*excluded, *(blocked.tolist() if blocked is not None else [])})


def _known_ids(window: np.ndarray, num_items: int) -> np.ndarray:
    """The ids of a window that a vocabulary of ``num_items`` items knows (unknown items are negative)."""
    return window[(window > 0) & (window <= num_items)]


def _cold(users: list[tuple[int, str]], per_user: dict[tuple[int, str], list[_Served]],
          records: dict[tuple[int, str], UserRecord]) -> list[bool]:
    """Per event, user by user in offset order (as ``_advance`` ranks them): whether no item of the user's window
    up to it is one the model knows (each an unknown item, under ``stream.unknown_items=oov``)."""
    cold = []
    for u in users:
        known = bool((records[u].window > 0).any())
        for s in per_user[u]:
            known = known or s.unknown is None
            cold.append(not known)
    return cold


def _json(record: dict[str, Any]) -> bytes:
    """A recommendation's JSON: orjson (a tenth of json.dumps's cost); json for what orjson refuses (a user id
    with a lone surrogate, which a JSON event can carry)."""
    try:
        return orjson.dumps(record)
    except orjson.JSONEncodeError:
        return json.dumps(record, separators=(",", ":")).encode()


def _failure(prefix: str, exc: BaseException) -> str:
    """A one-line dead-letter reason for an exception raised by one record."""
    return f"{prefix}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def dead_letter_copy(inp: Input, reason: str, source_topic: str, max_bytes: int
                     ) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """(key, value, headers) of a refused record's dead-letter copy: the original key, value and headers plus
    ours. A copy over ``max_bytes`` keeps the first DLQ_TRUNCATED_VALUE_BYTES of its value (none when
    ``max_bytes`` is 0, and only the original key when short) and says so with the original's size and sha256."""
    ours = [("lrustream.reason", reason.encode()), ("lrustream.source.topic", source_topic.encode()),
            ("lrustream.source.partition", str(inp.partition).encode()),
            ("lrustream.source.offset", str(inp.offset).encode())]
    key, value, original = inp.key, inp.value, list(inp.headers or [])
    size = len(key or b"") + len(value or b"") + sum(len(k) + len(v or b"") for k, v in original)
    if size <= max_bytes:
        return key, value, original + ours
    ours += [("lrustream.truncated", b"true"), ("lrustream.original.size", str(len(value or b"")).encode()),
             ("lrustream.original.sha256", hashlib.sha256(value or b"").hexdigest().encode())]
    if max_bytes == 0:
        short_key = key if key is not None and len(key) <= DLQ_STUB_MAX_KEY_BYTES else None
        return short_key, None, ours
    return key, (value or b"")[:DLQ_TRUNCATED_VALUE_BYTES], original + ours
