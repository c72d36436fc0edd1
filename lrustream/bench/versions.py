"""Version-rollout benchmark (``lrustream bench versions``): how long a published model version takes to be
served by every worker, with nothing shared but the broker.

Set-up. Fresh topics; ``--workers`` worker processes, each with its own state dir, its own model store and its
own HTTP port, all in one consumer group; a "trainer" model store of its own publishes every version through
:func:`stream.versions.publish_version` (read the topic to its end, write the chunks, ``done``, ``@current``). A
first version is published before the workers start, and each must answer /health with "ok" and serve it.

Rounds. ``--rounds`` times, with an untrained LRURec of the configured shape (``--items`` items, a new seed each
round, built before the clock starts): t0, then ``publish_version``; t1 when it returns; then every worker's
GET /model is asked about every 10 ms (one keep-alive connection each) until all report the new version; t2 when
the last one does. Reported per round and as p50 / max: the publish call (t1 - t0), publish-return to all serving
(t2 - t1) and publish-start to all serving (t2 - t0). Polling starts only once the publish returns, so a worker
that was already serving by then is seen at the first poll: t2 - t1 is never below one poll's cost, and t2 - t0 is
the rollout time a deployment sees. The weights file's size is printed; with
``--large-items`` the rounds run again with that many items on the same workers.

Late worker. Finally one more worker starts with fresh dirs and port; the time from its spawn to its /model
showing the current version is reported. It includes the process start-up (interpreter, imports, topic checks),
not only reading the model-versions topic from its beginning.

One large version (:func:`publish_to_serving`, for other benchmarks to call): the same set-up with a first
version of :data:`FIRST_ITEMS` items, then one round of ``num_items`` items and the late worker, on topics of its
own that are deleted afterwards (a version of a million items is 260 MB on the broker's disk).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import TYPE_CHECKING

from lrustream.bench.requests import Client
from lrustream.bench.stream import drop_topics, topic_overrides
from lrustream.broker import free_port
from lrustream.children import percentile, spawn_cli, stop, wait_healthy
from lrustream.kernel.config import Config, load_config

if TYPE_CHECKING:
    from models.base import SeqRecModel
    from models.vocab import Vocabulary

Log = Callable[[str], None]
POLL_S = 0.01  # between two sweeps of every worker's /model
SERVE_TIMEOUT_S = 60.0  # longest wait for all workers to serve a version
START_TIMEOUT_S = 180.0  # longest wait for a worker to start serving
FIRST_ITEMS = 2_000  # items of the version workers serve before the timed one (publish_to_serving)


@dataclass
class WorkerProc:
    """One worker process and what the benchmark needs of it."""

    proc: Popen
    port: int
    log_path: Path
    client: Client


def start_worker(base: list[str], cfg: Config, tmp: Path, name: str) -> WorkerProc:
    """A worker with its own state dir, model store and HTTP port (the broker and topics are shared)."""
    port = free_port(cfg.http.host)
    folder = tmp / name
    overrides = [*base, f"state.dir={folder / 'state'}", f"model_store.dir={folder / 'models'}",
                 f"http.port={port}"]
    folder.mkdir(parents=True)
    log_path = tmp / f"{name}.log"
    proc = spawn_cli(["worker", "--loglevel", "warning", *overrides], log_path)
    return WorkerProc(proc, port, log_path, Client(cfg.http.host, port))


def serving_version(client: Client) -> str | None:
    """The version a worker's GET /model names; None when it serves none or does not answer."""
    status, body = client.get_json("/model")
    return body.get("version") if status == 200 else None


def wait_serving(workers: list[WorkerProc], version: str, timeout_s: float = SERVE_TIMEOUT_S) -> float:
    """Poll every worker's /model every POLL_S until all serve ``version``; the monotonic time the last one did."""
    pending = list(workers)
    deadline = time.monotonic() + timeout_s
    while True:
        pending = [w for w in pending if serving_version(w.client) != version]
        now = time.monotonic()
        if not pending:
            return now
        if now > deadline:
            ports = ", ".join(str(w.port) for w in pending)
            raise RuntimeError(f"workers on ports {ports} not serving {version} after {timeout_s:.0f} s")
        for w in pending:
            if w.proc.poll() is not None:
                raise RuntimeError(f"worker on port {w.port} exited (see {w.log_path})")
        time.sleep(POLL_S)


def random_model(cfg: Config, items: int, seed: int) -> tuple[SeqRecModel, Vocabulary]:
    """An untrained model of the configured shape: rollout cost does not depend on training."""
    import torch

    from models import build_model, model_config
    from models.vocab import Vocabulary

    torch.manual_seed(seed)
    return build_model(model_config(cfg.model), items), Vocabulary.identity(items)


def weights_bytes(cfg: Config, version: str) -> int:
    """Size of a published version's weights.safetensors in the model store of ``cfg``."""
    from models.store import WEIGHTS, ModelStore

    return (ModelStore(cfg.model_store.dir).versions_dir / version / WEIGHTS).stat().st_size


def rounds(trainer: Config, workers: list[WorkerProc], items: int, count: int, seed: int,
           log: Log) -> dict[str, float]:
    """``count`` publishes of ``items``-item versions, each timed until every worker serves it (docstring)."""
    from stream.versions import publish_version

    log(f"{items:,} items; rounds: {count}, workers: {len(workers)}")
    spans: dict[str, list[float]] = {"publish": [], "return_to_all": [], "start_to_all": []}
    size_mb = 0.0
    for r in range(count):
        model, vocab = random_model(trainer, items, seed + r)
        t0 = time.monotonic()
        version = publish_version(trainer, model, vocab, who="bench", reason="bench versions").version
        t1 = time.monotonic()
        t2 = wait_serving(workers, version, max(SERVE_TIMEOUT_S, items / 10_000))
        del model, vocab  # a large one is hundreds of MB
        for key, seconds in zip(spans, (t1 - t0, t2 - t1, t2 - t0), strict=True):
            spans[key].append(seconds)
        size_mb = weights_bytes(trainer, version) / 1e6
        log(f"  round {r + 1}: {version} ({size_mb:.2f} MB of weights) published in {t1 - t0:.3f} s; every "
            f"worker serving it {t2 - t1:.3f} s after the publish returned, {t2 - t0:.3f} s after it started")
    figures = {f"items{items}_weights_mb": size_mb}
    for key, values in spans.items():
        figures[f"items{items}_{key}_p50_s"] = percentile(values, 0.5)
        figures[f"items{items}_{key}_max_s"] = max(values)
    p = f"items{items}_"
    log(f"  {items:,} items ({size_mb:.2f} MB): publish p50 {figures[p + 'publish_p50_s']:.3f} s, max "
        f"{figures[p + 'publish_max_s']:.3f} s; publish-return -> all serving p50 "
        f"{figures[p + 'return_to_all_p50_s']:.3f} s, max {figures[p + 'return_to_all_max_s']:.3f} s; "
        f"publish-start -> all serving p50 {figures[p + 'start_to_all_p50_s']:.3f} s, max "
        f"{figures[p + 'start_to_all_max_s']:.3f} s")
    return figures


def late_worker(base: list[str], cfg: Config, tmp: Path, version: str, log: Log) -> dict[str, float]:
    """Spawn one more worker (fresh dirs and port) and time it until its /model shows ``version``."""
    t0 = time.monotonic()
    worker = start_worker(base, cfg, tmp, "worker-late")
    try:
        seconds = wait_serving([worker], version, START_TIMEOUT_S) - t0
    finally:
        worker.client.close()
        stop([worker.proc])
    log(f"late worker: serving {version} {seconds:.3f} s after its spawn (process start-up included)")
    return {"late_worker_s": seconds}


@dataclass
class Cluster:
    """A benchmark's topics, its trainer's config and its workers, each serving the first version."""

    shared: list[str]  # overrides every process gets (topics, broker); workers add their dirs and port
    trainer: Config
    tmp: Path
    workers: list[WorkerProc]


@contextlib.contextmanager
def cluster(base: list[str], workers: int, first_items: int, workdir: Path, log: Log,
            drop: bool = False) -> Iterator[Cluster]:
    """Fresh topics, a first version of ``first_items`` items, and ``workers`` workers serving it; stopped on
    exit, and their topics deleted when ``drop``."""
    from stream.topics import create_topics
    from stream.versions import publish_version

    tag = f"versions-{uuid.uuid4().hex[:6]}"
    tmp = workdir.resolve() / tag
    tmp.mkdir(parents=True, exist_ok=True)
    shared = topic_overrides(base, tag, tmp)  # each worker overrides state.dir, model_store.dir and http.port
    trainer = load_config(overrides=[*shared, f"model_store.dir={tmp / 'trainer-models'}"])
    create_topics(trainer)
    first = publish_version(trainer, *random_model(trainer, first_items, 0), who="bench").version
    procs = [start_worker(shared, trainer, tmp, f"worker-{i}") for i in range(workers)]
    try:
        for w in procs:
            wait_healthy(trainer, w.proc, w.log_path, START_TIMEOUT_S, port=w.port)
        wait_serving(procs, first, START_TIMEOUT_S)
        log(f"workers: {workers}, each healthy and serving {first} (logs in {tmp})")
        yield Cluster(shared, trainer, tmp, procs)
    finally:
        for w in procs:
            w.client.close()
        stop([w.proc for w in procs])
        if drop:
            drop_topics(trainer, log)


def latest_late_worker(c: Cluster, log: Log) -> dict[str, float]:
    """:func:`late_worker` for the version the cluster's first worker serves."""
    serving = serving_version(c.workers[0].client)
    assert serving is not None
    return late_worker(c.shared, c.trainer, c.tmp, serving, log)


def run(base: list[str], workers: int, count: int, items: int, large_items: int, workdir: Path,
        log: Log = print) -> dict[str, float]:
    """The whole benchmark (module docstring); returns every figure it printed, by name."""
    results: dict[str, float] = {}
    with cluster(base, workers, items, workdir, log) as c:
        results.update(rounds(c.trainer, c.workers, items, count, 1, log))
        if large_items:
            results.update(rounds(c.trainer, c.workers, large_items, count, 1000, log))
        results.update(latest_late_worker(c, log))
    return results


def publish_to_serving(num_items: int, workers: int = 2, base: list[str] | None = None,
                       workdir: Path = Path(".lrustream/bench"), log: Log = print) -> dict[str, float]:
    """One version of ``num_items`` items, published while ``workers`` workers serve a small one, timed until
    every worker serves it; then a late worker's spawn to serving it. Topics of its own, deleted afterwards.
    Returns ``weights_mb``, ``publish_s`` (the publish call), ``publish_to_serving_s`` (publish start to every
    worker serving) and ``late_worker_s``."""
    with cluster(base or [], workers, FIRST_ITEMS, workdir, log, drop=True) as c:
        figures = rounds(c.trainer, c.workers, num_items, 1, 1, log)
        late = latest_late_worker(c, log)
    p = f"items{num_items}_"
    return {"weights_mb": figures[p + "weights_mb"], "publish_s": figures[p + "publish_p50_s"],
            "publish_to_serving_s": figures[p + "start_to_all_p50_s"], "late_worker_s": late["late_worker_s"]}
