"""The online trainer as an operated service: Prometheus ``GET /metrics`` and ``GET /health`` like the worker.

:class:`TrainerMetrics` turns each round record (exactly as written to the model store's ``rounds.jsonl``) and
each poll into counters and gauges under ``lrustream_trainer_``; it owns its registry, so several can live in
one process. :class:`TrainerHealth` says "ok", or "degraded" with one line of reason: polling the examples
topic is failing, the last round raised, or examples are waiting and none has been consumed for
``stall_after_s`` outside a round. It clears by itself once polls and rounds succeed again.

:class:`TrainerHttp` serves both on a daemon thread (stdlib ``ThreadingHTTPServer``, no extra dependency):
``GET /health`` (200 ok / 503 degraded, never needs a token: probes), ``GET /metrics`` and ``GET /``, the
operator page of trainer/page.py (both need ``Authorization: Bearer TOKEN`` when a token is set, 401
otherwise; the worker's check,
``lrustream.kernel.http.bearer_authorised``), any other path 404, any other method 405. Note the worker itself leaves
its read-only ``/metrics`` open and guards only ``POST /refresh``; :attr:`TrainerHttp.GUARDED` is the one place
to change that choice. Binding beyond loopback without a token is refused or warned about by the caller
(``lrustream.kernel.http.check_http_exposure``). Requests are not logged, so the token never reaches a log.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lrustream.kernel.http import bearer_authorised

log = logging.getLogger("lrustream.trainer")

ROUND_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PREFIX = "lrustream_trainer_"
HEALTH_STATES = ("ok", "degraded")  # what TrainerHealth.report can say


def _number(value: Any) -> float:
    """A gauge value from a JSON field: None or garbage become NaN (shown, never a crash)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class TrainerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.rounds = Counter(PREFIX + "rounds", "Fine-tuning rounds run", registry=r)
        self.published = Counter(PREFIX + "published", "Versions published by a round", registry=r)
        self.refused = Counter(PREFIX + "refused", "Rounds that published nothing, by reason code", ["reason"],
                               registry=r)
        self.examples = Counter(PREFIX + "examples", "Training-example records consumed", registry=r)
        self.events = Counter(PREFIX + "events", "New events carried by the consumed training examples",
                              registry=r)
        self.buffer_users = Gauge(PREFIX + "buffer_users", "Users whose window the replay buffer holds", registry=r)
        self.buffer_events = Gauge(PREFIX + "buffer_events", "Events in the replay buffer's windows", registry=r)
        self.examples_lag = Gauge(PREFIX + "examples_lag", "Training examples in the topic not yet consumed",
                                  registry=r)
        self.last_round = Gauge(PREFIX + "last_round_timestamp_seconds", "Unix time the last round ended",
                                registry=r)
        self.gate_candidate = Gauge(PREFIX + "gate_candidate", "Last gate: candidate's holdout metric", ["metric"],
                                    registry=r)
        self.gate_serving = Gauge(PREFIX + "gate_serving", "Last gate: serving version's holdout metric",
                                  ["metric"], registry=r)
        self.gate_diff_low = Gauge(PREFIX + "gate_diff_low", "Last gate: CI low of candidate - serving NDCG@10",
                                   registry=r)
        self.gate_diff_high = Gauge(PREFIX + "gate_diff_high", "Last gate: CI high of candidate - serving NDCG@10",
                                    registry=r)
        self.gate_heldout = Gauge(PREFIX + "gate_heldout_events", "Last gate: held-out events scored", registry=r)
        self.vocabulary = Gauge(PREFIX + "vocabulary_items", "Items the learner's vocabulary holds (at most "
                                "online.max_items)", registry=r)
        self.unknown_items = Gauge(PREFIX + "unknown_items", "Distinct items of the last round's windows left "
                                   "unknown because the vocabulary is full", registry=r)
        self.serving_info = Gauge(PREFIX + "serving_info", "Serving model version", ["version"], registry=r)
        self.rollbacks = Counter(PREFIX + "rollbacks", "Versions rolled back automatically because they served "
                                 "worse live than their parent (trainer/live.py)", registry=r)
        self.live_hit_rate = Gauge(PREFIX + "live_hit_rate", "Live HR@K of a version: its recommendations' hits over "
                                   "the events scored against them, as the training examples report", ["version"],
                                   registry=r)
        self.live_events = Gauge(PREFIX + "live_events", "Events scored against a version's recommendations",
                                 ["version"], registry=r)
        self.round_seconds = Histogram(PREFIX + "round_seconds", "Seconds per round", registry=r,
                                       buckets=ROUND_BUCKETS)
        self.refused_in_a_row = Gauge(PREFIX + "refused_in_a_row", "Rounds refused one after the other since the "
                                      "last publish (or the start): 0 once a round publishes", registry=r)
        self.last_published = Gauge(PREFIX + "last_published_timestamp_seconds", "Unix time the last version "
                                    "was published: by a round of this trainer, else when the version serving at "
                                    "start-up was created; 0 while no version exists", registry=r)
        self.learning_rate = Gauge(PREFIX + "learning_rate", "The learning rate the next round fine-tunes at: "
                                   "online.lr at first, halved after a candidate that did not beat the serving "
                                   "model on its held-out events, raised again (up to online.lr) after one that "
                                   "did", registry=r)
        self.health = Gauge(PREFIX + "health", "1 for the state GET /health reports (ok, degraded), 0 for the "
                            "other; set whenever /health or /metrics is asked", ["state"], registry=r)
        self.set_health("ok")

    def observe_poll(self, examples: int, events: int) -> None:
        """One poll consumed ``examples`` records carrying ``events`` new events."""
        self.examples.inc(max(examples, 0))
        self.events.inc(max(events, 0))

    def observe_buffer(self, users: int, events: int) -> None:
        self.buffer_users.set(users)
        self.buffer_events.set(events)

    def observe_lag(self, lag: int | None) -> None:
        """Examples not yet consumed; None (unknown) leaves the last value."""
        if lag is not None:
            self.examples_lag.set(lag)

    def observe_round(self, entry: Mapping[str, Any]) -> None:
        """One round record as written to rounds.jsonl; any key may be missing."""
        self.rounds.inc()
        at = _number(entry.get("at"))
        at = at if math.isfinite(at) else time.time()
        if version := entry.get("published"):
            self.published.inc()
            self.set_version(str(version))
            self.refused_in_a_row.set(0)
            self.last_published.set(at)
        if reason := entry.get("refused"):
            self.refused.labels(reason=str(reason)).inc()
            self.refused_in_a_row.inc()
        seconds = _number(entry.get("seconds"))
        if math.isfinite(seconds) and seconds >= 0:
            self.round_seconds.observe(seconds)
        self.last_round.set(at)
        self._observe_gate(entry.get("gate") or {})
        if (items := _number(entry.get("vocabulary"))) > 0:  # a round that got as far as its vocabulary
            self.vocabulary.set(items)
            self.unknown_items.set(_number(entry.get("unknown_items")))

    def _observe_gate(self, gate: Mapping[str, Any]) -> None:
        """The gate numbers a round produced; a round without a gate (no data) keeps the previous ones."""
        for gauge, key in ((self.gate_candidate, "candidate"), (self.gate_serving, "serving")):
            if isinstance(values := gate.get(key), Mapping):
                gauge.clear()
                for metric, value in values.items():
                    gauge.labels(metric=str(metric)).set(_number(value))
        for gauge, key in ((self.gate_diff_low, "diff_low"), (self.gate_diff_high, "diff_high"),
                           (self.gate_heldout, "heldout")):
            if key in gate:
                gauge.set(_number(gate[key]))

    def observe_live(self, watch: Any) -> None:
        """The live figures of the versions a :class:`trainer.live.LiveWatch` keeps."""
        self.live_hit_rate.clear()
        self.live_events.clear()
        for version, tally in watch.tallies.items():
            if tally.events:
                self.live_hit_rate.labels(version=version).set(tally.hits / tally.events)
                self.live_events.labels(version=version).set(tally.events)

    def set_version(self, version: str) -> None:
        self.serving_info.clear()
        self.serving_info.labels(version=version).set(1)

    def set_health(self, state: str) -> None:
        """The state /health reports; one outside :data:`HEALTH_STATES` is a bug, refused."""
        if state not in HEALTH_STATES:
            raise ValueError(f"unknown health state {state!r}")
        for each in HEALTH_STATES:
            self.health.labels(state=each).set(1 if each == state else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class TrainerHealth:
    stall_after_s: float = 60.0
    progress_at: float = field(default_factory=time.monotonic)  # last example consumed / round done / start-up
    polled_at: float | None = None  # last successful poll of the examples topic
    poll_error: str | None = None  # polling failing and not recovered
    poll_failing_since: float | None = None
    round_error: str | None = None  # the last round raised
    round_since: float | None = None  # a round in progress (no polling meanwhile, so no stall)

    def polled(self, now: float | None = None, *, examples: int = 0) -> None:
        """A successful poll; ``examples`` > 0 counts as progress for the stall rule."""
        now = time.monotonic() if now is None else now
        self.polled_at = now
        self.poll_error, self.poll_failing_since = None, None
        if examples > 0:
            self.progress_at = now

    def poll_failed(self, exc: BaseException, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.poll_error = f"{type(exc).__name__}: {exc}"
        if self.poll_failing_since is None:
            self.poll_failing_since = now

    def round_started(self, now: float | None = None) -> None:
        self.round_since = time.monotonic() if now is None else now

    def round_failed(self, exc: BaseException, now: float | None = None) -> None:
        self.round_error = f"{type(exc).__name__}: {exc}"
        self.round_since = None
        self.progress_at = time.monotonic() if now is None else now  # not stalled: it just tried

    def round_done(self, now: float | None = None) -> None:
        self.round_error, self.round_since = None, None
        self.progress_at = time.monotonic() if now is None else now

    def report(self, lag: int | None, now: float | None = None) -> tuple[str, str | None]:
        """(status, reason). ``lag``: training examples in the topic not yet consumed, if known."""
        now = time.monotonic() if now is None else now
        if self.poll_error is not None:
            since = now - (self.poll_failing_since if self.poll_failing_since is not None else now)
            return "degraded", f"polling training examples failing for {since:.0f} s: {self.poll_error}"
        if self.round_error is not None:
            return "degraded", f"last round failed: {self.round_error}"
        idle = now - self.progress_at
        if self.round_since is None and lag and lag > 0 and idle > self.stall_after_s:
            return "degraded", f"{lag} training examples waiting, none consumed for {idle:.0f} s"
        return "ok", None


def health_body(status: str, reason: str | None, **facts: Any) -> tuple[dict[str, Any], int]:
    """The /health answer: ``{"status", **facts, "reason"?}`` and 200 for "ok", 503 otherwise."""
    body: dict[str, Any] = {"status": status, **facts}
    if reason:
        body["reason"] = reason
    return body, 200 if status == "ok" else 503


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), handler)


class TrainerHttp:
    """``/health`` and ``/metrics`` of the trainer on a daemon thread; ``port`` is the bound one after start."""

    GUARDED = frozenset({"/metrics", "/"})  # paths that need the bearer token when one is set

    def __init__(self, host: str, port: int, token: str | None, health: Callable[[], tuple[dict[str, Any], int]],
                 metrics: Callable[[], bytes], page: Callable[[], str] | None = None) -> None:
        self.host, self.port, self.token = host, port, token
        self.health, self.metrics, self.page = health, metrics, page
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def authorised(self, header: str | None) -> bool:
        return bearer_authorised(self.token, header)

    def start(self) -> TrainerHttp:
        self._server = _Server(self.host, self.port, self._handler())
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="trainer-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=10)

    def answer(self, path: str, auth: str | None) -> tuple[int, bytes, str]:
        """(status, body, content type) of ``GET path``."""
        if path in self.GUARDED and not self.authorised(auth):
            return _json({"error": "a valid bearer token is required"}, 401)
        if path == "/health":
            body, status = self.health()
            return _json(body, status)
        if path == "/metrics":
            return 200, self.metrics(), CONTENT_TYPE_LATEST
        if path == "/" and self.page is not None:
            return 200, self.page().encode(), "text/html; charset=utf-8"
        return _json({"error": f"no such endpoint: {path}"}, 404)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        http = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    status, body, ctype = http.answer(urlsplit(self.path).path, self.headers.get("Authorization"))
                except Exception as exc:
                    log.exception("trainer HTTP %s failed", urlsplit(self.path).path)
                    status, body, ctype = _json({"error": f"{type(exc).__name__}: {exc}"}, 500)
                self._send(status, body, ctype)

            def _refuse(self) -> None:
                self._send(*_json({"error": f"method {self.command} not allowed"}, 405), allow="GET")

            do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

            def _send(self, status: int, body: bytes, ctype: str, allow: str | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                if status == 401:
                    self.send_header("WWW-Authenticate", "Bearer")
                if allow:
                    self.send_header("Allow", allow)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # no request log: quiet stderr, and the Authorization header never reaches a log

        return Handler


def _json(body: Mapping[str, Any], status: int) -> tuple[int, bytes, str]:
    return status, json.dumps(body).encode(), "application/json"
