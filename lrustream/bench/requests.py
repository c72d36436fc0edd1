"""Request benchmark (``lrustream bench requests``): GET /recommendations latency at a steady request rate.

One worker owns every partition (so every user is an owned user) of fresh topics holding ``--events`` events of
the data set, all served before the first request. Then, at ``--rate`` requests/s for ``--seconds`` each, one
client on one keep-alive connection asks for:

1. users the worker holds a state for, while no event arrives;
2. users it has never seen (the popular fallback);
3. users it holds, while the stream replays ``--stream-rate`` events/s beside the requests.

A warm-up of WARM_UP_S seconds of requests comes first, on a line of its own: a worker's first answers pay
for first calls (kernels, caches) that a running one does not. Requests are sent on a fixed schedule, and each
one's latency runs from its scheduled time to its answer, so a slow answer also counts in the requests queued
behind it (no coordinated omission). Every answer must be a 200 with items; the others are counted and
reported.
"""

from __future__ import annotations

import gc
import http.client
import json
import random
import time
import uuid
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from urllib.parse import quote

from lrustream.bench.stream import Output, drop_topics, publish_random_model, topic_overrides
from lrustream.broker import free_port
from lrustream.children import QUANTILES, format_ms, percentile, spawn_cli, stop
from lrustream.kernel.config import Config, load_config

Log = Callable[[str], None]
WARM_UP_S = 2.0  # of requests before the measured phases, reported on a line of their own


def run(base: list[str], data: str, events: int, rate: float, seconds: float, stream_rate: float, workdir: Path,
        log: Log = print) -> dict[str, float]:
    """The whole benchmark (module docstring); returns every figure it printed, by name."""
    from lrustream.replay import replay
    from trainer.data import load_sequences

    cfg, overrides, tmp, port = served_topics(base, f"requests-{uuid.uuid4().hex[:6]}", workdir)
    sent = replay(cfg, data, None, events, False)
    known = sorted({str(user) for user, _, _ in islice(load_sequences(data).events(), events)})
    publish_random_model(cfg, data)
    proc = spawn_cli(["worker", "--loglevel", "warning", *overrides], tmp / "log")
    output = Output(cfg)
    results: dict[str, float] = {}
    try:
        served = output.read(sent, timeout_s=sent / 500 + 120)
        log(f"worker: {served} of {sent} events served; {len(known)} users hold a state")
        client = Client(cfg.http.host, port)
        rng = random.Random(0)
        phases = {
            "owned": lambda: rng.choice(known),
            "unknown": lambda: f"never-seen-{rng.randrange(10**9)}",
        }
        phase(client, "warm-up (first answers of a fresh worker; not in the figures below)", phases["owned"], rate,
              WARM_UP_S, log)
        for name, pick in phases.items():
            results.update(phase(client, name, pick, rate, seconds, log))
        # in a process of its own: a replay thread here would take the client's GIL (reading the data set alone
        # holds it for half a second)
        streaming = spawn_cli(["produce", "--data", data, "--rate", str(stream_rate), "--limit",
                               str(round(stream_rate * (seconds + 5))), *overrides], tmp / "produce.log")
        try:
            time.sleep(5.0)  # the data set read and the first events out
            results.update(phase(client, f"owned, stream at {stream_rate:,.0f} events/s", phases["owned"], rate,
                                 seconds, log, key="owned_streaming"))
        finally:
            stop([streaming])
    finally:
        output.close()
        stop([proc])
        drop_topics(cfg, log)
    return results


def served_topics(base: list[str], tag: str, workdir: Path) -> tuple[Config, list[str], Path, int]:
    """A run's own topics (created), dirs and HTTP port: (its config, the overrides naming them, its folder, the
    port)."""
    from stream.topics import create_topics

    tmp = workdir.resolve() / tag
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    overrides = [*topic_overrides(base, tag, tmp), f"http.port={port}"]
    cfg = load_config(overrides=overrides)
    create_topics(cfg)
    return cfg, overrides, tmp, port


class Client:
    """GETs of a worker's JSON endpoints on one keep-alive connection (reopened after an error)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.conn = http.client.HTTPConnection(host, port, timeout=10)

    def get(self, user: str) -> tuple[int, dict]:
        """GET /recommendations/{user}."""
        return self.get_json(f"/recommendations/{quote(user, safe='')}")

    def get_json(self, path: str) -> tuple[int, dict]:
        """(status, parsed body); (0, {"error": ...}) when there is no answer."""
        try:
            self.conn.request("GET", path)
            resp = self.conn.getresponse()
            return resp.status, json.loads(resp.read())
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
            return 0, {"error": str(exc)}

    def close(self) -> None:
        self.conn.close()


def phase(client: Client, name: str, pick: Callable[[], str], rate: float, seconds: float, log: Log,
          key: str | None = None) -> dict[str, float]:
    """``rate * seconds`` requests on schedule; latencies (ms) from each one's scheduled time.

    The client's own garbage collector is off during the phase: a full collection here walks everything this
    process loaded (the data set's users) and took up to 160 ms, which the schedule then charged to the worker
    as the latency of the 30 requests due meanwhile (measured with gc.callbacks: the at-rest p99 moved with
    it). The replay does the same (lrustream/replay.py)."""
    n = max(1, round(rate * seconds))
    latencies, failed, fallbacks = [], 0, 0
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter() + 0.1
        for i in range(n):
            due = start + i / rate
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            status, body = client.get(pick())
            latencies.append((time.perf_counter() - due) * 1000)
            if status != 200 or not body.get("items"):
                failed += 1
            fallbacks += body.get("fallback") == "popular"
    finally:
        if collecting:
            gc.enable()
    figures = {q: percentile(latencies, share) for q, share in QUANTILES}
    log(f"requests, {name} @ {rate:,.0f}/s: {n} sent, {failed} not answered with items, {fallbacks} popular "
        f"fallbacks; latency " + ", ".join(f"{q} {format_ms(v)}" for q, v in figures.items()))
    prefix = f"requests_{key or name}_"
    return {prefix + "failed": float(failed), **{f"{prefix}{q}_ms": v for q, v in figures.items()}}
