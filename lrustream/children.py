"""Child processes for the commands that run the pipeline themselves (demo, evaluate-stream, bench stream):
start one with its log, wait until a worker answers /health, stop them all, and summarise latencies.

Latencies come from the recommendation records themselves (``stream/processor.py`` writes them, all in ms):
``kafka_ts`` (the input event's Kafka CreateTime), ``received_ts`` (when the worker's consumer handed the event
to the processor; absent in records of older workers) and ``emitted_ts`` (when the recommendation was produced).
:func:`latency_stages` splits them into queueing, processing and total; :func:`stage_percentiles` and
:func:`format_stages` summarise that split as p50 / p99 / p99.9. The worker's own histograms (``/metrics``,
stream/metrics.py) split processing further, per micro-batch and per recommendation: :func:`scrape_histograms`
or :func:`settled_histograms` before and after a run, then :func:`worker_stages` and :func:`format_worker_stages`.

Children run ``python -P`` so that a folder in the working directory named like one of our packages (a
``models/`` model store, say) cannot shadow it.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lrustream.kernel.config import Config


def spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    """``python -P ARGS`` with stdout and stderr appended to ``log_path``."""
    log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen([sys.executable, "-P", *args], stdout=log_file, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def spawn_cli(args: list[str], log_path: Path) -> subprocess.Popen:
    """``lrustream ARGS`` as a child."""
    return spawn(["-m", "lrustream.cli", *args], log_path)


def wait_healthy(cfg: Config, proc: subprocess.Popen, log_path: Path, timeout_s: float = 120,
                 port: int | None = None, what: str = "worker") -> None:
    """Return when the child (the worker, or another service on ``port``) answers /health; raise with the
    log's tail if it exits or never answers."""
    url = f"http://{cfg.http.host}:{port or cfg.http.port}/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(f"{what} exited:\n" + "\n".join(tail))
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{what} not healthy after {timeout_s:.0f} s (see {log_path})")


def stop(procs: Iterable[subprocess.Popen], timeout_s: float = 30) -> None:
    """SIGTERM every child (they commit and close cleanly), then wait; SIGKILL what does not end in time."""
    procs = list(procs)
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


TIMESTAMPS = ("kafka_ts", "received_ts", "emitted_ts")
STAGES = ("queueing", "processing", "total")  # received_ts - kafka_ts, emitted_ts - received_ts, their sum
QUANTILES = (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999))


def timestamps(rec: Any) -> dict[str, int]:
    """The latency fields of a decoded recommendation record (nothing else is kept; {} for a non-record)."""
    if not isinstance(rec, dict):
        return {}
    return {k: rec[k] for k in TIMESTAMPS if isinstance(rec.get(k), int)}


def latency_stages(records: Iterable[Mapping[str, Any]], since_ms: int = 0) -> dict[str, list[float]]:
    """Latencies in ms, by stage, of the records whose input event was produced at or after ``since_ms``:
    ``total`` (emitted_ts - kafka_ts) for every record with both (a kafka_ts of 0 or less is "no timestamp"),
    ``queueing`` (received_ts - kafka_ts) and ``processing`` (emitted_ts - received_ts) for those that also carry
    received_ts. Every stage is a key, empty when no record had what it needs."""
    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for rec in records:
        kafka_ts, emitted_ts = rec.get("kafka_ts"), rec.get("emitted_ts")
        if kafka_ts is None or kafka_ts <= 0 or kafka_ts < since_ms or emitted_ts is None:
            continue
        stages["total"].append(float(emitted_ts - kafka_ts))
        if (received_ts := rec.get("received_ts")) is not None:
            stages["queueing"].append(float(received_ts - kafka_ts))
            stages["processing"].append(float(emitted_ts - received_ts))
    return stages


def stage_percentiles(stages: Mapping[str, list[float]], unserved: int = 0) -> dict[str, dict[str, float]]:
    """{stage: {"p50": ms, "p99": ms, "p99.9": ms}} for the stages with values. ``unserved`` events (sent, but
    no recommendation within the wait) count as infinitely late in ``total``: a percentile that reaches them is
    ``inf``, never a flattering figure from the events that happened to be served."""
    out: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        values = list(stages.get(stage, []))
        if stage == "total" and unserved > 0:
            values += [math.inf] * unserved
        if values:
            out[stage] = {name: percentile(values, q) for name, q in QUANTILES}
    return out


WORKER_STAGES = (  # (key, what it times, the worker's histogram in stream/metrics.py)
    ("model", "model step and scoring per micro-batch", "lrustream_model_step_seconds"),
    ("ack", "produce to broker ack per recommendation", "lrustream_recommendation_ack_seconds"),
    ("commit", "commit, the input loop waiting", "lrustream_commit_seconds"),
)
WORKER_STAGE_FIGURES = ("p50_ms", "p99_ms", "count")  # what worker_stages gives of each
Buckets = dict[str, list[tuple[float, float]]]  # histogram -> its cumulative (upper bound in s, count), ascending


def scrape_histograms(cfg: Config, port: int | None = None) -> Buckets:
    """The buckets of the worker's :data:`WORKER_STAGES` histograms now ({} when /metrics does not answer)."""
    url = f"http://{cfg.http.host}:{port or cfg.http.port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return parse_histograms(resp.read().decode())
    except OSError:
        return {}


def settled_histograms(cfg: Config, port: int | None = None) -> Buckets:
    """:func:`scrape_histograms` once the worker has committed again: a commit flushes its producer, which serves
    every delivery report still pending, so the ack times of what it produced before are all observed."""
    time.sleep(cfg.stream.commit_interval_ms / 1000 + 0.5)
    return scrape_histograms(cfg, port)


def parse_histograms(text: str) -> Buckets:
    """The buckets of the :data:`WORKER_STAGES` histograms in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {name for _, _, name in WORKER_STAGES}
    return {family.name: sorted((float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket"))
            for family in text_string_to_metric_families(text) if family.name in wanted}


def bucket_quantile(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float) -> float:
    """The upper bound (ms) of the bucket that holds quantile ``q`` of what one histogram observed between two
    scrapes (nan when it observed nothing)."""
    counts = [(bound, now - then) for (bound, now), (_, then) in zip(after, before, strict=True)]
    total = counts[-1][1] if counts else 0
    return next((bound * 1000 for bound, n in counts if total > 0 and n >= q * total), math.nan)


def worker_stages(before: Buckets, after: Buckets) -> dict[str, dict[str, float]]:
    """{key: {"p50_ms": ms, "p99_ms": ms, "count": n}} of each :data:`WORKER_STAGES` histogram that observed something
    between the two scrapes (bucket upper bounds: "p99 5 ms" reads "99 % took at most 5 ms")."""
    out = {}
    for key, _, name in WORKER_STAGES:
        if name not in before or name not in after or len(before[name]) != len(after[name]):
            continue
        count = after[name][-1][1] - before[name][-1][1]
        if count > 0:
            out[key] = {"p50_ms": bucket_quantile(before[name], after[name], 0.5),
                        "p99_ms": bucket_quantile(before[name], after[name], 0.99), "count": count}
    return out


def format_worker_stages(stages: Mapping[str, Mapping[str, float]]) -> str:
    """``model step and scoring per micro-batch p50 <= 2 ms, p99 <= 5 ms (3,000); ...`` for the stages present."""
    return "; ".join(f"{what} p50 <= {stages[key]['p50_ms']:g} ms, p99 <= {stages[key]['p99_ms']:g} ms "
                     f"({stages[key]['count']:,.0f})" for key, what, _ in WORKER_STAGES if key in stages)


def format_ms(ms: float) -> str:
    return "unserved" if math.isinf(ms) else f"{ms:,.1f} ms"


def format_stages(summary: Mapping[str, Mapping[str, float]], stages: Iterable[str] = STAGES) -> str:
    """``total p50 1.2 ms, p99 3.4 ms, p99.9 5.6 ms; queueing ...; processing ...`` (total first; only the
    stages named and present)."""
    wanted = set(stages)
    order = [s for s in ("total", "queueing", "processing") if s in wanted and s in summary]
    return "; ".join(f"{s} " + ", ".join(f"{name} {format_ms(summary[s][name])}" for name, _ in QUANTILES)
                     for s in order)
