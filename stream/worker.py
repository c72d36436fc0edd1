"""The Faust application of a streaming worker: the input loop (stream/pipeline.py, its own thread) plus the
operator HTTP endpoints, the hot swap, housekeeping and the stop on a signal. What a batch applies, emits and
commits is the contract in stream/processor.py's docstring; how batches are taken, committed and retried is
stream/pipeline.py's (each stated there only).

Faust hosts the process: the web server, the timers and tasks, the signals. It does not consume the input:
its stream delivers ~5,700 events/s at most on a 2-core machine and acknowledges a batch when the
loop body returns, so outputs could not stay in flight across batches. Nor are states a Faust table: table
writes need ``current_event()`` (faust-streaming #497), and its recovery has open races after hard kills
(#596); the state store (state/README.md) has its own changelog and offset guard instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import faust
import orjson
import torch
from faust.app.base import BootStrategy
from faust.web import Request, Response, View

from lrustream.kernel.config import Config, resolve_path
from lrustream.kernel.http import bearer_authorised, check_http_exposure
from lrustream.kernel.kafka import faust_broker_settings, librdkafka_config, producer_config, quiet_logger
from models.store import ModelStore
from state.store import Changelog, StateStore
from stream.health import Liveness
from stream.metrics import WorkerMetrics
from stream.pipeline import Pipeline
from stream.processor import Fetch, GapFillError, Input, Processor
from stream.queries import Owners, redirect_location, user_in_path, worker_client_id
from stream.retrieval import ANY_ROWS, IndexSettings
from stream.serving import Serving
from stream.topics import create_topics, topic_id
from stream.versions import VersionLog
from stream.vocabularies import OlderVocabularies

log = logging.getLogger("lrustream.worker")

RETRY_LOAD_AFTER_S = 10.0  # a version that failed to load for a transient reason (file missing, I/O) is tried again
MAX_SWAPS_KEPT = 100  # what /model remembers of swaps and refusals
EXPIRY_SCAN, EXPIRY_SLICE = 10_000, 1_000  # idle states looked at per partition per housekeeping run, per step
STOP_GRACE_S = 2.0  # after a stop signal, how long the last commit may wait for the broker
VERSIONS_WAIT_S = 60.0  # at start, how long reading the model-versions topic to its end may take
CATALOGUE_WAIT_S = 30.0  # the first event waits at most this long for the items topic to be read to its end
CATALOGUE_RETRY_S = 10.0  # an items topic that could not be read is tried again after this long
MAX_REQUEST_K = 1000  # the most items one request may ask for (a version seeds its popular fallback with as many)
_K_DIGITS = re.compile("[0-9]{1,9}")  # what a request's k may be: ASCII digits (int() takes " 5", "1_0", "٣" too)
POPULAR_SHOWN = 10  # the popular fallback's top items in /metrics
GIL_SWITCH_S = 0.0001  # see Worker.run


def fetch_range(cfg: Config, chunk_size: int = 1000, stall_s: float = 30.0) -> Fetch:
    """A direct reader of input offsets [first, last] of one partition (the guard against consumer skips): yields
    them in chunks of at most ``chunk_size`` and raises GapFillError on a fetch error, or when nothing moves for
    ``stall_s`` before ``last`` is passed. Offsets without a record (transaction markers, compaction) are holes
    the consumer's position moves past, not losses."""
    from confluent_kafka import Consumer, TopicPartition

    def fetch(partition: int, first: int, last: int) -> Iterator[list[Input]]:
        consumer = Consumer(librdkafka_config(cfg, **{"group.id": f"{cfg.stream.app_id}-gapfill",
                                                      "enable.auto.commit": False}))
        tp = TopicPartition(cfg.topics.interactions, partition, first)
        try:
            consumer.assign([tp])
            position, moved_at = first, time.monotonic()
            while position <= last:
                chunk, before = [], position
                for msg in consumer.consume(num_messages=chunk_size, timeout=1.0):
                    if msg.error():
                        raise GapFillError(f"partition {partition}: fetching offsets {first}..{last} failed at "
                                           f"{position}: {msg.error()}")
                    if msg.offset() <= last:
                        _, ts = msg.timestamp()
                        chunk.append(Input(partition, msg.offset(), msg.key(), msg.value(), ts if ts > 0 else None,
                                           msg.headers()))
                    position = max(position, msg.offset() + 1)
                position = max(position, consumer.position([tp])[0].offset)
                if chunk:
                    yield chunk
                if position > last:
                    return
                if position > before:
                    moved_at = time.monotonic()
                elif time.monotonic() - moved_at > stall_s:
                    raise GapFillError(f"partition {partition}: offsets {position}..{last} not fetched within "
                                       f"{stall_s:.0f} s (of {first}..{last})")
        finally:
            consumer.close()

    return fetch


class Worker:
    """Everything one worker process holds: config, processor, pending model swap, Faust app."""

    def __init__(self, cfg: Config, serving: Serving | None = None) -> None:
        from confluent_kafka import Producer

        self.cfg = cfg
        self.http_warning = check_http_exposure(cfg)  # refuses an unguarded API before anything is opened
        self.model_store = ModelStore(resolve_path(cfg.model_store.dir))
        create_topics(cfg)
        self.versions = VersionLog(cfg, self.model_store, who=f"worker {worker_client_id(cfg)}")
        self.swaps: list[dict[str, Any]] = []  # what happened to each version named (served / refused why)
        self.index_settings = IndexSettings(cfg.stream.approximate_above_items, cfg.stream.approximate_recall,
                                            cfg.stream.top_k)
        self._indexing: asyncio.Future[None] | None = None  # the index build in flight (_index_what_is_served)
        self.serving = serving or self._first_serving()
        self.model_ready = asyncio.Event()  # set once a version is served: the input loop waits for it
        self.metrics = WorkerMetrics()
        self.metrics.version_records_ignored.set_function(lambda: self.versions.bad_records)
        changelog = Changelog(librdkafka_config(cfg, logger=quiet_logger("lrustream.changelog")),
                              cfg.topics.state_changelog)
        self.store = StateStore(state_dir(cfg), changelog,
                                input_identity=functools.partial(topic_id, cfg, cfg.topics.interactions))
        self.producer = Producer(producer_config(cfg, **{"linger.ms": 2, "acks": "all"}))
        self.vocabularies = OlderVocabularies(self.model_store, lambda: self.processor.serving)
        self.processor = Processor(self.serving, self.store, self.producer, stream=cfg.stream, topics=cfg.topics,
                                   state_dtype=cfg.state.dtype, fetch=fetch_range(cfg), metrics=self.metrics,
                                   vocab_of=self.vocabularies)
        self.started = time.time()
        self.liveness = Liveness(cfg.stream.stall_after_s)
        self.pipeline = Pipeline(cfg, self.processor, self.store, self.metrics, self.liveness)
        self._shadow_refused: str | None = None  # a shadow version that could not be loaded
        self.owners = Owners(cfg)  # who answers requests for which users
        self.catalogue_read = asyncio.Event()  # the items topic was read to its end once (or could not be)
        self.app = self._build_app()

    # ----- the Faust app ------------------------------------------------------------------------------------
    def _build_app(self) -> faust.App:
        cfg = self.cfg
        datadir = resolve_path(cfg.state.dir) / "faust" / cfg.stream.app_id
        datadir.mkdir(parents=True, exist_ok=True)
        app = _ServiceHost(
            cfg.stream.app_id, **faust_broker_settings(cfg), datadir=str(datadir), store="memory://",
            topic_partitions=cfg.topics.partitions, topic_allow_declare=False, topic_disable_leader=True,
            consumer_auto_offset_reset="earliest", web_enabled=True, web_bind=cfg.http.host,
            web_port=cfg.http.port, web_host=cfg.http.host, logging_config=None,
        )

        @app.task
        async def consume() -> None:
            await self._run_pipeline()

        @app.timer(interval=housekeeping_interval_s(cfg))
        async def housekeeping() -> None:
            await self._housekeep()

        @app.task
        async def follow_versions() -> None:
            await self._follow_versions()

        @app.task
        async def follow_catalogue() -> None:
            await self._follow_catalogue()

        self._add_views(app)
        return app

    # ----- hot swap ---------------------------------------------------------------------------------------------
    def _first_serving(self) -> Serving | None:
        """The version to start with: the model-versions topic read to its end into the local store first (a
        worker that starts late serves what the others serve); the store's CURRENT as it was when the topic cannot
        be read now. When the version the topic names cannot be served (refused, corrupt), the newest one here
        that loads, as the workers that were running keep serving theirs (logged; refused ones are in /model).
        None while no version exists: the worker waits for one (health "waiting")."""
        from models.store import ModelStoreError

        try:
            self.versions.catch_up(VERSIONS_WAIT_S)
        except Exception as exc:  # the broker is slow or away: the local cache still knows what was served
            log.error("the %s topic could not be read (%s); starting with the local store's CURRENT",
                      self.cfg.topics.model_versions, exc)
        self._report_refusals()
        current = self.model_store.current()
        if current is None and self.versions.seen.serving() is None:
            log.warning("no model version yet: waiting for one on %s (lrustream train, or lrustream models push)",
                        self.cfg.topics.model_versions)
            return None
        store = self.model_store
        fallbacks = [v for v in reversed(store.versions()) if v != current and not store.collected(v)]
        for version in ([current] if current else []) + fallbacks:
            try:
                serving = Serving.load(self.model_store, version)
            except (ModelStoreError, OSError, ValueError) as exc:
                log.error("model version %s cannot be served: %s", version, exc)
                self._refused_load(version, exc)
                continue
            if version != current:
                log.error("serving %s, the newest version here that loads, until the topic names one that does "
                          "(it names %s)", version, current or self.versions.seen.serving())
            return serving
        return None

    async def _follow_versions(self) -> None:
        """Read the model-versions topic as it grows (stream/versions.py installs whole versions into the local
        store and mirrors its pointers) and swap between micro-batches to the store's CURRENT, so a version
        published while an operator pins serving is stored but never served. A read that fails is logged and
        tried again; serving goes on."""
        if self.processor.serving is not None:
            self.model_ready.set()
        while True:
            try:
                await asyncio.to_thread(self.versions.poll, 0.5)
            except Exception as exc:
                log.error("reading %s failed (%s); trying again", self.cfg.topics.model_versions, exc)
                await asyncio.sleep(1.0)
            self._report_refusals()
            version = self.model_store.current()
            if version and version != getattr(self.processor.serving, "version", None) and await self.swap_to(version):
                self.model_ready.set()
            await self._follow_shadow()
            self._index_what_is_served()

    def _index_what_is_served(self) -> None:
        """Build the approximate index (stream/retrieval.py) of the serving, then the shadow, version when it
        wants one, one build at a time, off the serving path: a version is served exactly from its swap until its
        index is attached, so a large catalogue's index never delays a swap."""
        if self._indexing is not None and not self._indexing.done():
            return
        shadow = self.processor.shadow
        for serving in (self.processor.serving, shadow.candidate if shadow is not None else None):
            if serving is not None and not serving.index_tried:
                self._indexing = asyncio.ensure_future(self._attach_index(serving))
                return

    async def _attach_index(self, serving: Serving) -> None:
        try:
            index = await asyncio.to_thread(serving.attach_index, self.index_settings)
        except Exception:  # a failed build leaves the version ranked exactly
            log.exception("the approximate index of version %s could not be built; ranking it exactly",
                          serving.version)
            return
        if index is None:
            return
        if not index.max_rows:
            log.warning("version %s stays ranked exactly: its approximate index (recall@%d %.4f, %d of %d clusters "
                        "scanned, built in %.1f s) was slower than exact ranking", serving.version,
                        self.index_settings.k, index.recall, index.nprobe, index.nlist, index.build_seconds)
            return
        log.warning("version %s ranks through an approximate index from now on: recall@%d %.4f, %d of %d clusters "
                    "scanned, for calls of %s (built in %.1f s)", serving.version, self.index_settings.k,
                    index.recall, index.nprobe, index.nlist,
                    "any size" if index.max_rows >= ANY_ROWS else f"up to {index.max_rows} rows", index.build_seconds)
        if serving is self.processor.serving:
            self.metrics.set_version(serving.version, index)

    def _report_refusals(self) -> None:
        """Versions the topic held that could not be installed, into what /model shows."""
        for version, why in self.versions.new_refusals:
            self._record_swap({"version": version, "ok": False, "reason": why, "retry": False, "at": time.time()})
        self.versions.new_refusals.clear()

    def _refused_load(self, version: str, exc: Exception) -> bool:
        """Record a version that failed to load (in /model); True when the failure may pass (a file missing or
        unreadable for now), so that swap_to tries it again later, False for a corrupt version."""
        retry = isinstance(exc, OSError) or getattr(exc, "transient", False)
        self._record_swap({"version": version, "ok": False, "reason": str(exc), "retry": retry, "at": time.time()})
        return retry

    def _record_swap(self, entry: dict[str, Any]) -> None:
        self.swaps.append(entry)
        del self.swaps[:-MAX_SWAPS_KEPT]

    async def _follow_shadow(self) -> None:
        """Score the store's SHADOW version beside the serving one, or stop (stream/shadow.py). A version that
        cannot be loaded is logged once and not tried again until SHADOW names another."""
        from models.store import ModelStoreError

        wanted = self.model_store.shadow()
        shadow = self.processor.shadow
        if self.processor.serving is None:
            return  # shadowing starts with serving
        if wanted == (shadow.version if shadow else None) or (wanted is not None and wanted == self._shadow_refused):
            return
        candidate = None
        if wanted is not None:
            try:
                candidate = await asyncio.to_thread(Serving.load, self.model_store, wanted)
            except (ModelStoreError, OSError, ValueError) as exc:
                log.error("shadow version %s refused: %s; not shadowing", wanted, exc)
                self._shadow_refused = wanted
        await self._between_batches(self.processor.set_shadow, candidate)
        if candidate is not None:
            log.warning("shadow scoring %s beside %s", wanted, self.processor.serving.version)

    async def swap_to(self, version: str) -> bool:
        """Load and verify ``version`` off the serving path, then switch between two micro-batches."""
        from models.store import ModelStoreError

        t0 = time.monotonic()
        refused = [s for s in self.swaps if s["version"] == version and not s["ok"]]
        if refused and not (refused[-1]["retry"] and time.time() - refused[-1]["at"] > RETRY_LOAD_AFTER_S):
            return False  # a corrupt version stays refused; a transient failure is retried now and then
        try:
            serving = await asyncio.to_thread(Serving.load, self.model_store, version)
        except (ModelStoreError, OSError, ValueError) as exc:
            retry = self._refused_load(version, exc)
            log.error("refused model version %s: %s; still serving %s%s", version, exc,
                      getattr(self.processor.serving, "version", "nothing"),
                      f"; retrying in {RETRY_LOAD_AFTER_S:.0f} s" if retry else "")
            return False
        old = getattr(self.processor.serving, "version", None)
        await asyncio.to_thread(self.vocabularies.swapped, self.processor.serving, serving)
        await self._between_batches(self.processor.swap, serving)
        took = time.monotonic() - t0
        log.warning("now serving model version %s (was %s); swap took %.3f s", version, old, took)
        self._record_swap({"version": version, "ok": True, "previous": old, "seconds": round(took, 3),
                           "at": time.time()})
        return True

    # ----- catalogue control -------------------------------------------------------------------------------------
    async def _follow_catalogue(self) -> None:
        """Read the items topic (stream/catalogue.py) to its end before the first event, then follow it; each
        change applies between two micro-batches. A topic that cannot be read never stops serving: it is logged,
        and read again from its beginning after CATALOGUE_RETRY_S."""
        from stream.catalogue import Blocked, CatalogueFollower

        while True:
            blocked, follower = Blocked(), None
            try:
                follower = await asyncio.to_thread(CatalogueFollower, self.cfg)
                blocked.apply(await asyncio.to_thread(follower.read_to_end, CATALOGUE_WAIT_S))
                await self._block(frozenset(blocked.items))
                self.catalogue_read.set()
                while True:
                    if blocked.apply(await asyncio.to_thread(follower.poll, 0.5)):
                        await self._block(frozenset(blocked.items))
            except Exception as exc:
                log.error("the items topic %r cannot be read (%s): serving without catalogue changes until it "
                          "can (lrustream topics create makes it); trying again in %.0f s",
                          self.cfg.topics.items, exc, CATALOGUE_RETRY_S)
                self.catalogue_read.set()
            finally:
                if follower is not None:
                    follower.close()
            await asyncio.sleep(CATALOGUE_RETRY_S)

    async def _block(self, items: frozenset[str]) -> None:
        await self._between_batches(self.processor.block, items)
        self.metrics.blocked_items.set(len(items))

    # ----- the input loop ---------------------------------------------------------------------------------------
    async def _run_pipeline(self) -> None:
        """The input loop on its own thread, for the app's lifetime; a loop that dies ends the process (its
        orchestrator restarts it; nothing uncommitted is lost, stream/pipeline.py). It starts once the items
        topic has been read (or after CATALOGUE_WAIT_S), so that no blocked item is served at start-up, and once
        a model version is served: a worker started before any exists waits in no consumer group, so its
        partitions stay with workers that can serve them."""
        try:
            await asyncio.wait_for(self.catalogue_read.wait(), CATALOGUE_WAIT_S)
        except TimeoutError:
            log.error("the items topic was not read within %.0f s: serving before it is", CATALOGUE_WAIT_S)
        await self.model_ready.wait()
        thread = self.pipeline.start()
        try:
            while thread.is_alive():
                await asyncio.sleep(0.2)
        except asyncio.CancelledError:  # the app is stopping
            self.pipeline.request_stop()
            raise
        if not self.pipeline.stop_requested.is_set():
            _exit_now("the input loop ended unexpectedly")

    async def _housekeep(self) -> None:
        """Every ``housekeeping_interval_s``, whether events flow or not, between two micro-batches: claim and
        restore the partitions this worker owns that no event has made ready yet (their states are then current
        here, and a former owner is fenced now rather than at the next event), then delete the states idle for
        ``state.ttl_days``, scanning up to EXPIRY_SCAN records per partition (state/README.md) in slices of
        EXPIRY_SLICE with batches in between, so events never wait for a whole scan. A failure is retried next
        time."""
        partitions = self.assigned()
        ttl_s = self.cfg.state.ttl_days * 86_400
        expired = 0
        try:
            await self._between_batches(self._ensure_ready, partitions)
            cutoff_ms = int((time.time() - ttl_s) * 1000)
            for p in self.store.ready_partitions() if ttl_s > 0 else []:
                for _ in range(EXPIRY_SCAN // EXPIRY_SLICE):
                    expired += await self._between_batches(self.store.expire, p, cutoff_ms, EXPIRY_SLICE)
        except Exception as exc:
            log.warning("housekeeping (restoring idle partitions, expiring idle states) failed (%s); trying "
                        "again in %.0f s", exc, housekeeping_interval_s(self.cfg))
        self.metrics.expired.inc(expired)

    async def _between_batches(self, job: Any, *args: Any) -> Any:
        return await asyncio.wrap_future(self.pipeline.between_batches(functools.partial(job, *args)))

    def _ensure_ready(self, partitions: list[int]) -> None:
        for p in partitions:
            self.store.ensure_ready(p)

    def pending(self, partitions: list[int]) -> int | None:
        """Events in ``partitions`` past the last one applied (None when nothing is known yet)."""
        return self.pipeline.behind(partitions)

    def health(self) -> tuple[dict[str, Any], int]:
        partitions = self.assigned()
        status, reason = self.liveness.report(self.pending(partitions))
        if not self.pipeline.ready.is_set():
            status, reason = "starting", "joining the consumer group and restoring the partitions it assigns"
        if self.processor.serving is None:
            status, reason = "waiting", f"waiting for a model: no version on {self.cfg.topics.model_versions} yet"
        body = {"status": status, "model_version": getattr(self.processor.serving, "version", None),
                "partitions": partitions,
                "batches": self.pipeline.batches, "uptime_s": round(time.time() - self.started, 1)}
        if reason:
            body["reason"] = reason
        if (since := self.liveness.busy_since) is not None:
            body["batch_in_progress_s"] = round(time.monotonic() - since, 3)
        self.metrics.set_health(status)
        return body, 200 if status == "ok" else 503

    def assigned(self) -> list[int]:
        """Input partitions this worker currently owns (empty before the group has assigned any)."""
        return list(self.pipeline.assignment)

    # ----- requests -----------------------------------------------------------------------------------------------
    async def answer(self, user_id: str, query: Mapping[str, str]) -> tuple[dict[str, Any], int, dict[str, str]]:
        """GET /recommendations/{user_id}?k=N&exclude=a,b (stream/README.md, "Requests"): (body, status,
        headers), ``user_id`` as the path carries it (percent-encoded UTF-8). Answered here from the user's state
        when this worker owns the user's partition, else a redirect to the owner (stream/queries.py); 503 with
        Retry-After while no worker can answer; 400 with a one-line reason for an id that is not percent-encoded
        UTF-8 or that no event could carry (stream/events.py's ``check_id``: 1 to MAX_ID_CHARS characters, no
        control characters), or a ``k`` that is not 1 to MAX_REQUEST_K."""
        from state.store import NotReady
        from stream.events import BadEvent, check_id

        started = time.perf_counter()
        if self.processor.serving is None:
            return self._unavailable("no model version is served yet")
        try:
            user = check_id(user_in_path(user_id), "user_id")
            k = request_k(query.get("k"), self.cfg.stream.top_k)
            exclude = [x for x in query.get("exclude", "").split(",") if x]
        except (BadEvent, ValueError) as exc:
            self.metrics.requests.labels(answer="bad").inc()
            return {"error": str(exc)}, 400, {}
        try:
            if (partition := self.owners.partition_of(user)) is None:
                await asyncio.to_thread(self.owners.refresh)
                partition = self.owners.partition_of(user)
            assert partition is not None
            held = partition in self.pipeline.assignment
            owner = None if held else await asyncio.to_thread(self.owners.owner, partition)
        except Exception as exc:  # the broker cannot be asked who owns the user
            return self._unavailable(f"the owner of user {user!r} cannot be found now: {exc}")
        if held:
            try:
                body = self.processor.recommend(partition, user, k, exclude)
            except NotReady as exc:
                return self._unavailable(str(exc))
            except Exception as exc:  # e.g. a stored record that cannot be decoded: this user only
                log.error("request for user %r failed: %s: %s", user, type(exc).__name__, exc)
                self.metrics.requests.labels(answer="failed").inc()
                return {"error": f"{type(exc).__name__}: {exc}"}, 500, {}
            self.metrics.requests.labels(answer=body.get("fallback", "model")).inc()
            self.metrics.request_latency.observe(time.perf_counter() - started)
            return body, 200, {}
        if owner is None or owner == self.owners.me:
            return self._unavailable(f"no worker owns partition {partition} now (a rebalance is under way)")
        self.metrics.requests.labels(answer="redirect").inc()
        location = redirect_location(owner, user, query)
        return {"owner": owner, "partition": partition}, 307, {"Location": location}

    def _unavailable(self, why: str) -> tuple[dict[str, Any], int, dict[str, str]]:
        self.metrics.requests.labels(answer="unavailable").inc()
        return {"error": why}, 503, {"Retry-After": "1"}

    # ----- operator HTTP ------------------------------------------------------------------------------------
    def authorised(self, request: Request) -> bool:
        return bearer_authorised(self.cfg.http.token, request.headers.get("Authorization"))

    def _add_views(self, app: faust.App) -> None:
        worker = self

        class Health(View):
            async def get(self, request: Request) -> Response:
                body, status = worker.health()
                return self.json(body, status=status)

        class ModelView(View):
            async def get(self, request: Request) -> Response:
                s = worker.processor.serving
                shadow = worker.processor.shadow
                return self.json({"version": s and s.version, "model": s and s.model.name,
                                  "num_items": s and s.num_items, "shadow": shadow.version if shadow else None,
                                  "swaps": worker.swaps[-20:]})

        class Recommendations(View):
            async def get(self, request: Request, user_id: str) -> Response:
                raw_id = request.rel_url.raw_path.rpartition("/")[2]  # user_id, as sent (aiohttp leaves %FF as is)
                body, status, headers = await worker.answer(raw_id, dict(request.query))
                return self.bytes(orjson.dumps(body), content_type="application/json", status=status,
                                  headers=headers)

        class Metrics(View):
            async def get(self, request: Request) -> Response:
                worker.metrics.states.set(worker.store.count())
                worker.health()  # the state is derived from time (a stall), so it is worked out at each scrape
                if worker.processor.serving is not None:
                    worker.metrics.set_popular(*worker.processor.popular_top(POPULAR_SHOWN, ()))
                return self.bytes(worker.metrics.render(), content_type="text/plain; version=0.0.4")

        class Refresh(View):
            async def post(self, request: Request) -> Response:
                if not worker.authorised(request):
                    return self.json({"error": "a valid bearer token is required"}, status=401)
                from stream.updates import request_refresh

                await asyncio.to_thread(request_refresh, worker.cfg, "http")
                return self.json({"status": "refresh requested"}, status=202)

        app.page("/refresh")(Refresh)
        app.page("/health")(Health)
        app.page("/model")(ModelView)
        app.page("/metrics")(Metrics)
        app.page("/recommendations/{user_id}")(Recommendations)

    # ----- lifecycle ----------------------------------------------------------------------------------------
    def run(self, loglevel: str = "info") -> None:
        """Blocks until SIGINT/SIGTERM; a clean stop commits what was applied (stream/pipeline.py).

        The input loop and the HTTP endpoints are two threads of one interpreter. A thread that wants the GIL
        while another runs Python waits up to the switch interval (CPython's default 5 ms) at every hand-over,
        and a request hands over at each socket call and model operation. With the default, requests queued
        without bound while events streamed in; at 0.5 ms an owned user's p99 was 5-7 ms with no events
        arriving, at 0.1 ms 4-5 ms (``lrustream bench requests``). A short interval costs nothing while only one
        thread runs. torch gets ``stream.torch_threads`` threads (the config says why one)."""
        sys.setswitchinterval(GIL_SWITCH_S)
        if self.cfg.stream.torch_threads:
            torch.set_num_threads(self.cfg.stream.torch_threads)
        if self.http_warning:
            log.warning(self.http_warning)
        worker = _StopSignalWorker(self.app, loglevel=loglevel, override_logging=True,
                                   on_stop_signal=self.stop_processing)
        try:
            worker.execute_from_commandline()
        finally:
            self.pipeline.request_stop()
            self.pipeline.join(self.cfg.stream.stop_timeout_s)
            self.store.close()
            self.versions.close()

    def stop_processing(self) -> None:
        """On SIGTERM/SIGINT: the input loop stops after the batch in hand and commits what it applied; if that
        is not done within a grace period (the broker is gone), waits for acknowledgements or a full producer
        queue give up (see Processor) and it is left uncommitted; the process exits ``stream.stop_timeout_s``
        after the signal whatever Faust's own stop is doing. Exiting then is a crash, which the durability
        contract (stream/processor.py) covers: nothing uncommitted is lost, it is redelivered."""
        self.pipeline.request_stop()
        timeout_s = self.cfg.stream.stop_timeout_s
        hurry = threading.Timer(min(STOP_GRACE_S, timeout_s / 2), self._give_up_waiting)
        watchdog = threading.Timer(timeout_s, _exit_now, [f"still stopping {timeout_s:.0f} s after the signal"])
        for timer in (hurry, watchdog):
            timer.daemon = True
            timer.start()

    def _give_up_waiting(self) -> None:
        self.processor.stopping.set()
        if self.store.changelog is not None:
            self.store.changelog.stopping.set()


class _NoKafkaBoot(BootStrategy):
    """Faust starts no consumer, producer or conductor of its own: the input loop has its own clients."""

    enable_kafka = False


class _ServiceHost(faust.App):
    """The Faust app of a worker: web endpoints, timers and tasks (module docstring)."""

    BootStrategy = _NoKafkaBoot


class _StopSignalWorker(faust.Worker):
    """faust.Worker that reports SIGTERM/SIGINT before stopping. Faust cancels its tasks, but the input loop runs
    in a thread that a cancel cannot reach: a batch waiting for a dead broker would keep the process alive for a
    minute. ``_schedule_shutdown`` is mode's one entry point for both signals."""

    def __init__(self, *args: Any, on_stop_signal: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_stop_signal = on_stop_signal

    def _schedule_shutdown(self, signal: Any) -> None:
        self._on_stop_signal()
        super()._schedule_shutdown(signal)


def request_k(text: str | None, default: int) -> int:
    """A request's ``k``: ``default`` when the query has none, else ASCII digits naming 1 to MAX_REQUEST_K;
    otherwise ValueError with a one-line reason that names ``k`` and its range (``int()`` would accept ``" 5"``
    and ``"1_0"``, and its own messages name Python's limits, not the parameter)."""
    if text is None:
        return default
    if _K_DIGITS.fullmatch(text) is None or not 1 <= int(text) <= MAX_REQUEST_K:
        raise ValueError(f"k must be 1 to {MAX_REQUEST_K}, not {text[:20]!r}")
    return int(text)


def _exit_now(why: str) -> None:
    log.error("%s (broker unreachable?): exiting without a clean stop; uncommitted events will be redelivered",
              why)
    logging.shutdown()
    os._exit(1)


def housekeeping_interval_s(cfg: Config) -> float:
    """A minute, or a quarter of a short state TTL (tests use seconds)."""
    ttl_s = cfg.state.ttl_days * 86_400
    return min(60.0, ttl_s / 4) if ttl_s > 0 else 60.0


def state_dir(cfg: Config) -> Path:
    return resolve_path(cfg.state.dir) / cfg.stream.app_id
