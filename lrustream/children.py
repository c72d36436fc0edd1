"""Child processes for the commands that run the pipeline themselves (demo, evaluate-stream, bench stream):
start one with its log, wait until a worker answers /health, stop them all, and summarise latencies.

Latencies come from the recommendation records themselves (``stream/processor.py`` writes them, all in ms):
``kafka_ts`` (the input event's Kafka CreateTime), ``received_ts`` (when the worker's consumer handed the event
to the processor; absent in records of older workers) and ``emitted_ts`` (when the recommendation was produced).
:func:`latency_stages` splits them into queueing, processing and total; :func:`stage_percentiles` and
:func:`format_stages` summarise that split as p50 / p99 / p99.9.

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


def format_ms(ms: float) -> str:
    return "unserved" if math.isinf(ms) else f"{ms:,.1f} ms"


def format_stages(summary: Mapping[str, Mapping[str, float]], stages: Iterable[str] = STAGES) -> str:
    """``total p50 1.2 ms, p99 3.4 ms, p99.9 5.6 ms; queueing ...; processing ...`` (total first; only the
    stages named and present)."""
    wanted = set(stages)
    order = [s for s in ("total", "queueing", "processing") if s in wanted and s in summary]
    return "; ".join(f"{s} " + ", ".join(f"{name} {format_ms(summary[s][name])}" for name, _ in QUANTILES)
                     for s in order)
