"""The worker's input loop: consume, apply, and commit on an interval, in one thread.

Faust's stream machinery delivers at most ~5,700 events/s on a 2-core machine even to an agent that does
nothing with them (``take_events``, measured beside a librdkafka consumer at ~780,000/s), and it acknowledges a
batch as soon as the loop body returns, so a body cannot let outputs be in flight while the next batch runs. The
worker therefore consumes with a confluent-kafka (librdkafka) consumer in this thread, as a member of the
consumer group ``stream.app_id`` (the group Faust used: its committed offsets carry over), and keeps Faust for
the web endpoints, the timers and the process's lifecycle (stream/worker.py).

The loop, one turn at a time:

1. **Take what is there.** Wait for the first record (no longer than until the next commit is due), then take
   every record already fetched, up to ``stream.batch_size``: no linger, so a lone event is served at once and
   a backlog makes batches large by itself.
2. **Apply** the batch (:meth:`stream.processor.Processor.apply`): recommendations and dead letters are produced
   and left in flight; the new states are pending in memory, read by the next batches.
3. **Commit on an interval.** Every ``stream.commit_interval_ms`` (and before a rebalance, and on a clean
   stop) :meth:`~stream.processor.Processor.commit` waits until everything produced so far is acknowledged and
   commits the states and applied-offset markers; only then are the input offsets committed to the group
   (asynchronously: the markers already make a redelivered event a no-op for the states). Jobs from other
   threads (a hot swap, a slice of housekeeping) run between two turns.

So every guarantee of stream/processor.py's contract holds for the events since the last commit as a whole: a
crash before the commit redelivers them all, and their recommendations may be emitted again. A failure of
apply or commit (an infrastructure fault, or ``Fenced``: a rebalance moved a partition while the batch was in
flight) discards what is pending and retries all the events since the last commit as one batch, from the
committed states, after a back-off of 0.2 s doubling up to ``MAX_BACKOFF_S``, jittered (x0.5..1.5) below that
bound; each retry, a fenced one included, counts in ``lrustream_batch_retries_total`` (a fence also in
``lrustream_fenced_batches_total``, by the processor) and leaves ``/health`` degraded with the failure until the
batch commits. A worker that is stopping gives up instead.

Rebalances run inside ``poll``/``consume`` on this thread (librdkafka's callbacks): partitions about to be
revoked are committed first, if that still succeeds (else their events go to the next owner, uncommitted); a
lost assignment (session timed out) is discarded; either way the store restores every partition again before
its next event (``mark_stale``, state/README.md).
"""

from __future__ import annotations

import gc
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from lrustream.kernel.config import Config
from lrustream.kernel.kafka import librdkafka_config
from state.store import Fenced, StateStore
from stream.health import Liveness
from stream.metrics import WorkerMetrics
from stream.processor import Input, Processor
from stream.queries import worker_client_id

log = logging.getLogger("lrustream.worker")

IDLE_POLL_S = 0.1  # how long an idle loop waits for a record before it looks at its jobs (a hot swap) and the stop flag
# again: a swap on an idle worker waited up to 0.5 s at 0.5 (lrustream bench versions); ten polls a second cost nothing
MAX_BACKOFF_S = 5.0  # no retry waits longer, jitter included (backoff_s)
HOLD_COMMIT_ENV = "LRUSTREAM_TEST_HOLD_COMMIT_WHILE"  # a test fault-injection point, off unless set: _hold_commit


class Pipeline:
    """The input loop of one worker (module docstring). ``run`` blocks until ``request_stop``; every other
    method may be called from any thread."""

    def __init__(self, cfg: Config, processor: Processor, store: StateStore, metrics: WorkerMetrics,
                 liveness: Liveness) -> None:
        self.cfg = cfg
        self.topic = cfg.topics.interactions
        self.processor = processor
        self.store = store
        self.metrics = metrics
        self.liveness = liveness
        self.interval_s = cfg.stream.commit_interval_ms / 1000
        self.stop_requested = threading.Event()
        self.ready = threading.Event()  # set once the first assignment is restored: /health says "ok" from then on
        self.assignment: list[int] = []  # input partitions this worker owns now
        self.last_offsets: dict[int, int] = {}  # per input partition, the last offset applied
        self.high_watermarks: dict[int, int] = {}  # per input partition, the end as the consumer last saw it
        self.batches = 0  # batches applied (a retry of everything since the last commit counts once)
        self._uncommitted: list[Input] = []  # every input applied since the last commit (a retry applies them again)
        self._last_commit = time.monotonic()
        self._jobs: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._jobs_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._consumer: Any = None
        self.sleep: Callable[[float], None] = time.sleep  # the retries' back-off wait (tests record it instead)
        self._hold_commit_while = os.environ.get(HOLD_COMMIT_ENV) or None  # tests only: see _hold_commit

    # ----- other threads ----------------------------------------------------------------------------------------
    def between_batches(self, job: Callable[[], Any]) -> Future[Any]:
        """Run ``job`` on the loop's thread between two batches (what they applied may not be committed yet:
        a job must not depend on it); at once, here, when the loop is not running. Hot swaps and housekeeping go
        through this; a job keeps the loop from taking events while it runs, so keep each one short."""
        future: Future[Any] = Future()
        with self._jobs_lock:
            running = self._thread is not None and self._thread.is_alive()
            if running:
                self._jobs.append((job, future))
        if not running:
            _run_job(job, future)
        return future

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, name="lrustream-pipeline", daemon=True)
        self._thread.start()
        return self._thread

    def request_stop(self) -> None:
        self.stop_requested.set()

    def join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ----- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        from confluent_kafka import Consumer

        # What exists now (modules, the Faust app, the first model) lives as long as the process: a full
        # collection walked all of it, stalling events for ~150 ms every few seconds. Frozen, it is
        # never walked; a swapped-in model is a few hundred objects, not worth freezing (frozen garbage is kept).
        gc.freeze()
        self.processor.warm_up()
        self._consumer = consumer = Consumer(self._consumer_config())
        consumer.subscribe([self.topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost)
        try:
            while not self.stop_requested.is_set():
                if batch := self._take(consumer):
                    self._apply(batch)
                if self._uncommitted and time.monotonic() - self._last_commit >= self.interval_s:
                    self._commit()
                if self._jobs:
                    self._run_jobs()
            if self._uncommitted and not self.processor.stopping.is_set():
                self._commit()  # a clean stop commits what it applied (a stop that must hurry abandons it)
        finally:
            self._fail_jobs()
            consumer.close()  # leaves the group now: the partitions move without waiting for the session timeout

    def _consumer_config(self) -> dict[str, Any]:
        stream = self.cfg.stream
        return librdkafka_config(self.cfg, **{
            "group.id": stream.app_id, "client.id": worker_client_id(self.cfg),  # the group says who owns what
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest", "session.timeout.ms": int(stream.session_timeout_s * 1000),
            "heartbeat.interval.ms": int(min(3.0, stream.session_timeout_s / 3) * 1000),
            "partition.assignment.strategy": "range",
        })

    def _take(self, consumer: Any) -> list[Input]:
        """Step 1: the first record (waiting only until the next commit is due, or a while when idle), then every
        record already fetched, up to the batch size."""
        if self._jobs:
            wait_s = 0.0
        elif self._uncommitted:
            wait_s = min(IDLE_POLL_S, max(0.0, self._last_commit + self.interval_s - time.monotonic()))
        else:
            wait_s = IDLE_POLL_S
        first = consumer.poll(wait_s)
        if first is None:
            return []
        messages = [first, *consumer.consume(self.cfg.stream.batch_size - 1, 0)]
        now_ms = int(time.time() * 1000)
        batch = []
        for msg in messages:
            if msg.error():
                self._consumer_error(msg.error())
                continue
            _, ts = msg.timestamp()
            batch.append(Input(msg.partition(), msg.offset(), msg.key(), msg.value(), ts if ts > 0 else None,
                               msg.headers(), now_ms))
        return batch

    def _consumer_error(self, err: Any) -> None:
        if err.fatal():
            raise RuntimeError(f"the input consumer failed for good: {err}")
        log.debug("input consumer: %s", err)

    def _apply(self, batch: list[Input]) -> None:
        """Step 2, or, on failure, a retry of everything since the last commit (module docstring). What /health
        calls the micro-batch in progress is that: from the first batch after a commit to the next commit."""
        if not self._uncommitted:
            self.liveness.started()
        self._uncommitted += batch
        try:
            self.processor.apply(batch)
        except Exception as exc:
            self._recover(exc)
        else:
            self._observe(batch)
            self.batches += 1

    def _commit(self) -> None:
        """Step 3: the states, then the input offsets."""
        if self._hold_commit_while:
            self._hold_commit(self._hold_commit_while)
        started = time.perf_counter()
        try:
            committed = self.processor.commit()
        except Exception as exc:
            self._recover(exc)
            return
        self.metrics.commit_latency.observe(time.perf_counter() - started)
        self._commit_offsets(committed)

    def _hold_commit(self, path: str) -> None:
        """A test fault-injection point, off (one attribute test per commit) unless the environment variable
        ``LRUSTREAM_TEST_HOLD_COMMIT_WHILE`` names a file: while that file exists, the commit step waits, the batch
        applied and not committed (a test freezes the worker there, the group hands its partitions to another,
        and the frozen one resumes as a former owner: tests/integration/test_fencing.py). Never set in service."""
        if not os.path.exists(path):
            return
        log.warning("test fault injection: the commit waits while %s exists", path)
        while os.path.exists(path) and not self.stop_requested.is_set():
            time.sleep(0.05)

    def _commit_offsets(self, committed: dict[int, int], asynchronous: bool = True) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        self._end_unit()
        if not committed:
            return
        offsets = [TopicPartition(self.topic, p, offset + 1) for p, offset in committed.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except KafkaException as exc:  # harmless: the markers make the redelivered events no-ops for the states
            log.warning("input offsets not committed (%s); the states are, so nothing is applied twice", exc)

    def _recover(self, first: Exception) -> None:
        """Discard what is pending and apply everything since the last commit again, committing it at once, until
        that succeeds or the worker stops."""
        batch, exc, delay = self._uncommitted, first, 0.2
        while True:
            self.processor.discard()
            self.store.mark_stale()
            if self.processor.stopping.is_set() or self.stop_requested.is_set():
                log.warning("stopping: %d events applied since the last commit are left to be redelivered",
                            len(batch))
                self._uncommitted = []
                return
            self._report(exc, len(batch), delay)
            self.sleep(backoff_s(delay))
            delay = min(delay * 2, MAX_BACKOFF_S)
            try:
                self.processor.process(batch)
            except Exception as again:
                exc = again
                continue
            self._observe(batch)
            self.batches += 1
            self._commit_offsets(self._applied_of(batch))
            return

    def _report(self, exc: Exception, events: int, delay: float) -> None:
        """Every retry is counted and leaves /health degraded until the batch commits (``_end_unit``), a fenced
        one too: expected during a rebalance, so logged as a warning without a traceback (the processor counts
        it in ``lrustream_fenced_batches_total`` and logs the refusal)."""
        self.liveness.failed(exc)
        self.metrics.batch_retries.inc()
        if isinstance(exc, Fenced):
            log.warning("retrying %d events in %.1f s, after claiming and restoring their partitions again",
                        events, delay)
            return
        log.error("applying %d events failed (%s); retrying in %.1f s", events, exc, delay, exc_info=delay == 0.2)

    @staticmethod
    def _applied_of(batch: list[Input]) -> dict[int, int]:
        last: dict[int, int] = {}
        for inp in batch:
            last[inp.partition] = max(last.get(inp.partition, -1), inp.offset)
        return last

    def _observe(self, batch: list[Input]) -> None:
        """Lag per partition: the end the consumer last saw (from its fetches, no request) past the last offset."""
        from confluent_kafka import TopicPartition

        last = self._applied_of(batch)
        self.last_offsets.update(last)
        for p, offset in last.items():
            try:
                _, high = self._consumer.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)
            except Exception:
                continue
            if high is not None and high >= 0:
                self.high_watermarks[p] = high
                self.metrics.lag.labels(partition=str(p)).set(max(0, high - offset - 1))

    def behind(self, partitions: list[int]) -> int | None:
        """Events in ``partitions`` past the last one applied, as the consumer last saw their ends (None when
        nothing is known yet)."""
        known = [self.high_watermarks[p] - self.last_offsets[p] - 1 for p in partitions
                 if p in self.high_watermarks and p in self.last_offsets]
        return sum(max(0, n) for n in known) if known else None

    # ----- jobs between batches ---------------------------------------------------------------------------------
    def _run_jobs(self) -> None:
        with self._jobs_lock:
            jobs, self._jobs = self._jobs, []
        for job, future in jobs:
            _run_job(job, future)

    def _fail_jobs(self) -> None:
        with self._jobs_lock:
            jobs, self._jobs = self._jobs, []
            self._thread = None
        for job, future in jobs:  # the loop is gone: run them here, as if it had never started
            _run_job(job, future)

    # ----- rebalances (librdkafka calls these from poll/consume, on this thread) --------------------------------
    def _assigned(self, consumer: Any, partitions: list[Any]) -> None:
        """Claim and restore the new partitions now, not at their first event (which would wait for it)."""
        self.assignment = sorted({*self.assignment, *(tp.partition for tp in partitions)})
        self.store.mark_stale()
        for tp in partitions:
            try:
                self.store.ensure_ready(tp.partition)
            except Exception as exc:  # the partition's first batch tries again
                log.warning("partition %d not restored on assignment (%s); its first batch will", tp.partition, exc)
        self.ready.set()

    def _revoked(self, consumer: Any, partitions: list[Any]) -> None:
        if self._uncommitted:
            try:
                self._commit_offsets(self.processor.commit(), asynchronous=False)
            except Exception as exc:
                log.warning("partitions revoked before %d events could be committed (%s); their next owner "
                            "applies them", len(self._uncommitted), exc)
                self._drop_uncommitted()
        self._forget(partitions)

    def _lost(self, consumer: Any, partitions: list[Any]) -> None:
        if self._uncommitted:
            log.warning("partitions lost (this worker was out of the group too long) with %d events applied and "
                        "not committed; their next owner applies them", len(self._uncommitted))
            self._drop_uncommitted()
        self._forget(partitions)

    def _drop_uncommitted(self) -> None:
        self.processor.discard()
        self._end_unit()

    def _end_unit(self) -> None:
        """The work since the last commit is committed or given up: a new unit starts with the next batch."""
        self._uncommitted = []
        self._last_commit = time.monotonic()
        self.liveness.finished()

    def _forget(self, partitions: list[Any]) -> None:
        gone = {tp.partition for tp in partitions}
        self.assignment = [p for p in self.assignment if p not in gone]
        for p in gone:
            self.last_offsets.pop(p, None)
            self.high_watermarks.pop(p, None)
        self.store.mark_stale()


def backoff_s(delay_s: float) -> float:
    """The wait before a retry: ``delay_s`` (already capped at MAX_BACKOFF_S) jittered x0.5..1.5, the upper end
    cut at the bound, so that no wait ever exceeds MAX_BACKOFF_S (at the bound the waits spread over 2.5..5 s)."""
    return random.uniform(0.5 * delay_s, min(1.5 * delay_s, MAX_BACKOFF_S))


def _run_job(job: Callable[[], Any], future: Future[Any]) -> None:
    try:
        future.set_result(job())
    except BaseException as exc:
        future.set_exception(exc)
