"""Prometheus metrics of one worker (its own registry, so several workers can live in one test process)."""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from stream.retrieval import ItemIndex
    from stream.shadow import Tally

# fine where the real-time path lives (a few ms: the per-stage split of `make demo` and `lrustream bench stream`
# reads these buckets, lrustream/children.py), coarse beyond
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# what GET /health can say (stream/worker.py, Worker.health); each is a series of lrustream_health, 1 for the
# state the worker is in and 0 for the others, so a rule can select one state and an absent series means no scrape
HEALTH_STATES = ("ok", "starting", "waiting", "degraded")


class WorkerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.events = Counter("lrustream_events", "Input events handled (served, dead-lettered or skipped)",
                              registry=r)
        self.recommendations = Counter("lrustream_recommendations", "Recommendation records emitted", registry=r)
        self.dlq = Counter("lrustream_dlq", "Events sent to the dead-letter topic", ["reason"], registry=r)
        self.batch_retries = Counter("lrustream_batch_retries",
                                     "Micro-batches retried after an infrastructure fault (broker, disk) or a "
                                     "fenced commit", registry=r)
        self.fenced = Counter("lrustream_fenced_batches",
                              "Micro-batches refused by the changelog because another worker had claimed a "
                              "partition of theirs (a rebalance moved it while the batch was in flight)", registry=r)
        self.expired = Counter("lrustream_expired_states", "User states deleted after state.ttl_days idle",
                               registry=r)
        self.skipped = Counter("lrustream_skipped_events", "Events skipped because already applied", registry=r)
        self.gap_filled = Counter("lrustream_gap_filled_events",
                                  "Events fetched directly because the consumer skipped offsets", registry=r)
        self.rederived = Counter("lrustream_rederived_states",
                                 "User states re-derived from their item window after a model swap", registry=r)
        self.batch_size = Histogram("lrustream_batch_size", "Events per micro-batch", registry=r,
                                    buckets=(1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096))
        self.step_latency = Histogram("lrustream_model_step_seconds", "Model step + scoring time per micro-batch",
                                      registry=r, buckets=LATENCY_BUCKETS)
        self.commit_latency = Histogram("lrustream_commit_seconds",
                                        "One commit (outputs acknowledged, changelog transaction, RocksDB); the "
                                        "input loop takes no event meanwhile", registry=r, buckets=LATENCY_BUCKETS)
        self.ack_latency = Histogram("lrustream_recommendation_ack_seconds",
                                     "A recommendation's produce call to the broker's acknowledgement (librdkafka's "
                                     "latency of the message)", registry=r, buckets=LATENCY_BUCKETS)
        self.e2r_latency = Histogram("lrustream_event_to_recommendation_seconds",
                                     "Event timestamp (Kafka) to recommendation produced", registry=r,
                                     buckets=LATENCY_BUCKETS)
        self.live_events = Counter("lrustream_live_events", "Events scored against the recommendation served for "
                                   "the user's event before (by the version that served it)", ["version"], registry=r)
        self.live_hits = Counter("lrustream_live_hits", "Of those, the events whose item was in that recommendation: "
                                 "live HR@K = rate(hits) / rate(events)", ["version"], registry=r)
        self.lag = Gauge("lrustream_consumer_lag", "Input events not yet consumed, per partition", ["partition"],
                         registry=r)
        self.states = Gauge("lrustream_states", "User states in this worker's local store (RocksDB's estimate)",
                            registry=r)
        self.events_per_s = Gauge("lrustream_events_per_second", "Input events/s over the last 10 s", registry=r)
        self.blocked_items = Gauge("lrustream_blocked_items", "Items the items topic blocks, as this worker read it",
                                   registry=r)
        self.model_version = Gauge("lrustream_model_info", "Serving model version", ["version"], registry=r)
        self.index_recall = Gauge("lrustream_worker_index_recall", "recall@K of the serving version's approximate "
                                  "index against exact ranking, measured when it was built (stream/retrieval.py); "
                                  "absent while ranking is exact", ["version"], registry=r)
        self.index_clusters = Gauge("lrustream_worker_index_scanned_clusters", "Item clusters the approximate index "
                                    "scans per query, of all it has", ["version", "of"], registry=r)
        self.version_records_ignored = Gauge("lrustream_model_version_records_ignored", "Records of the "
                                             "model-versions topic this worker ignored since it started because "
                                             "they break the topic's layout (each logged; stream/versions.py)",
                                             registry=r)
        self.requests = Counter("lrustream_requests", "GET /recommendations requests, by answer: model, popular "
                                "(fallback), redirect (another worker owns the user), unavailable, bad (request), "
                                "failed (the stored record)", ["answer"], registry=r)
        self.request_latency = Histogram("lrustream_request_seconds", "GET /recommendations answered here, "
                                         "request to response", registry=r, buckets=LATENCY_BUCKETS)
        self.shadow_events = Gauge("lrustream_shadow_events", "Events both the serving and the shadow version "
                                   "predicted, since shadowing began (stream/shadow.py)", ["serving", "shadow"],
                                   registry=r)
        self.shadow_hit_rate = Gauge("lrustream_shadow_hit_rate", "Prequential HR@K over those events: the share "
                                     "whose item was in the version's top-K after the user's event before",
                                     ["role", "version"], registry=r)
        self.popular = Gauge("lrustream_popular_item_weight", "The popular fallback's top items as this worker "
                             "ranks them: recency-weighted events seen here plus the serving version's seed "
                             "(stream/popular.py)", ["item"], registry=r)
        self.health = Gauge("lrustream_health", "1 for the state GET /health reports (ok, starting, waiting, "
                            "degraded), 0 for the others; set whenever /health or /metrics is asked", ["state"],
                            registry=r)
        self.set_health("starting")
        self._window: deque[tuple[float, int]] = deque()  # (when, events) per batch of the last 10 s
        self._window_events = 0  # their sum, kept as batches come and go (a batch is a few events at low rates)

    def observe_rate(self, n: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._window.append((now, n))
        self._window_events += n
        while now - self._window[0][0] > 10.0:
            self._window_events -= self._window.popleft()[1]
        span = max(now - self._window[0][0], 1.0)
        self.events_per_s.set(self._window_events / span)

    def set_version(self, version: str, index: ItemIndex | None = None) -> None:
        self.model_version.clear()
        self.model_version.labels(version=version).set(1)
        self.index_recall.clear()
        self.index_clusters.clear()
        if index is not None:
            self.index_recall.labels(version=version).set(index.recall)
            self.index_clusters.labels(version=version, of=str(index.nlist)).set(index.nprobe)

    def set_health(self, state: str) -> None:
        """The state /health reports; one outside :data:`HEALTH_STATES` is a bug, refused."""
        if state not in HEALTH_STATES:
            raise ValueError(f"unknown health state {state!r}")
        for each in HEALTH_STATES:
            self.health.labels(state=each).set(1 if each == state else 0)

    def set_shadow(self, tally: Tally | None) -> None:
        """Both versions' figures side by side (None: no shadow, nothing shown)."""
        self.shadow_events.clear()
        self.shadow_hit_rate.clear()
        if tally is None:
            return
        self.shadow_events.labels(serving=tally.serving, shadow=tally.shadow).set(tally.events)
        for role, version, hits in (("serving", tally.serving, tally.serving_hits),
                                    ("shadow", tally.shadow, tally.shadow_hits)):
            self.shadow_hit_rate.labels(role=role, version=version).set(hits / tally.events if tally.events else 0)

    def set_popular(self, items: list[str], weights: list[float]) -> None:
        self.popular.clear()
        for item, weight in zip(items, weights, strict=True):
            self.popular.labels(item=item).set(weight)

    def render(self) -> bytes:
        return generate_latest(self.registry)
