"""The main job, end to end on one machine: local broker, a model, a worker, a data-set replay, and the
recommendations flowing out with their latency. What ``make demo`` runs.

The summary gives the event-to-recommendation latency (the record's emitted_ts - kafka_ts) as p50, p99 and
p99.9 and, when the records carry ``received_ts``, split into queueing (kafka_ts to the worker's consumer
handing the event over) and processing (from there to the recommendation); then, from the worker's own
histograms over the timed events (from when the warm-up's recommendations have been read), its model step per
micro-batch, each recommendation's produce-to-ack time and its commits; see ``lrustream/children.py``.

Everything it starts is ordinary: the broker is ``lrustream broker start``'s, the worker is a
``lrustream worker`` subprocess, the replay is ``lrustream produce``'s code. It leaves the broker running
(``lrustream broker stop`` ends it) and stops the worker when the replay has been served.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lrustream.children import (
    Buckets,
    format_stages,
    format_worker_stages,
    latency_stages,
    scrape_histograms,
    settled_histograms,
    spawn_cli,
    stage_percentiles,
    stop,
    timestamps,
    wait_healthy,
    worker_stages,
)
from lrustream.kernel.config import Config, resolve_path

TITLE_FILES = (("movies.dat", "::"), ("u.item", "|"))  # MovieLens-1M (id::title::genres), ML-100K (id|title|...)
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DEMO_DATA = "ml-1m-subset-users1-2999"


def pick_data(data: str | None, workdir: Path, log: Callable[[str], None]) -> str:
    """The replay data: the argument, else the shared ML-1M subset, else a synthetic stream written here."""
    if data:
        return data
    shared = SHARED_DATA / DEMO_DATA
    if shared.exists():
        return str(shared)
    log(f"{shared} not found: using a synthetic stream")
    path = workdir / "synthetic" / "u.data"
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines, ts = [], 1_000_000_000
    for user in range(1, 501):  # each user walks a ring of 300 items: learnable, so recommendations mean something
        pos = rng.randrange(300)
        for _ in range(rng.randint(20, 80)):
            pos = (pos + rng.choice((1, 1, 2, 3))) % 300
            ts += rng.randint(1, 30)
            lines.append(f"{user}\t{pos + 1}\t5\t{ts}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def load_titles(data: str | Path) -> tuple[dict[str, str], Path | None]:
    """Item titles by item id from the titles file beside the data (``data`` a folder, or a file in it), and
    that file: MovieLens-1M's movies.dat or ML-100K's u.item, read as latin-1 (their encoding). Lines that are
    not ``id<sep>title<sep>...`` are skipped; no such file, or one that cannot be read: no titles."""
    folder = Path(data) if Path(data).is_dir() else Path(data).parent
    for name, sep in TITLE_FILES:
        path = folder / name
        try:
            text = path.read_text(encoding="latin-1")
        except OSError:
            continue
        titles = {}
        for line in text.splitlines():
            fields = line.split(sep)
            if len(fields) >= 2 and (item := fields[0].strip()) and (title := fields[1].strip()):
                titles[item] = title
        if titles:
            return titles, path
    return {}, None


def format_items(items: list[str], titles: dict[str, str]) -> str:
    """Item ids for the screen, each as ``id (title)`` where ``titles`` has one."""
    return ", ".join(f"{item} ({titles[item]})" if item in titles else item for item in items)


def ensure_model(cfg: Config, data: str, train_minutes: float, log: Callable[[str], None]) -> str:
    """The serving version, as the model-versions topic says: this host's stored one pushed there when the topic
    has none (a broker started afresh), else a small LRURec trained first."""
    from models.store import ModelStore
    from stream.versions import VersionLog

    store = ModelStore(resolve_path(cfg.model_store.dir))
    stored = store.current()  # read before the topic's pointers are mirrored into the store
    with VersionLog(cfg, store, who="demo") as versions:
        versions.catch_up()
        if serving := versions.seen.serving():
            log(f"model: serving {serving} from {cfg.topics.model_versions} (lrustream models list)")
            return serving
        if stored:
            versions.push(stored)
            log(f"model: published stored version {stored} on {cfg.topics.model_versions}")
            return stored
        from trainer.offline import run_offline

        log(f"model: none published yet; training {cfg.model.name} on {data} for up to {train_minutes:g} min")
        cfg = copy.deepcopy(cfg)  # a demo-sized run: short windows, frequent validation (early stopping works)
        cfg.model.max_len = min(cfg.model.max_len, 50)
        cfg.train.val_every = min(cfg.train.val_every, 50)
        [result] = run_offline(cfg, data, [cfg.model.name], resolve_path(".lrustream/runs"),
                               max_minutes=train_minutes, progress=sys.stderr.isatty(), log=log, publisher=versions)
        return result.version  # type: ignore[return-value]


def start_worker(config: Path | None, overrides: list[str], log_path: Path) -> subprocess.Popen:
    args = ["worker", "--loglevel", "warning"]
    if config:
        args += ["--config", str(config)]
    return spawn_cli([*args, *overrides, "stream.unknown_items=oov"], log_path)


def watch(cfg: Config, expect: Callable[[], int], timeout_s: float, log: Callable[[str], None],
          last_users: list[str] | None = None, on_read: Callable[[int], None] | None = None,
          titles: dict[str, str] | None = None) -> list[dict[str, int]]:
    """Read new recommendations until ``expect()`` have arrived (or ``timeout_s``), print a sample line per second
    (its first items, with their ``titles`` where known: three then, five otherwise), return each one's latency
    timestamps (:func:`lrustream.children.timestamps`); ``last_users`` ends with the users of the last records
    read (the latest last); ``on_read`` is given the count read so far after each fetch."""
    from confluent_kafka import Consumer, TopicPartition

    from lrustream.kernel.kafka import high_watermarks, librdkafka_config, topic_partitions

    topic = cfg.topics.recommendations
    # The reader only measures (each record carries its own timestamps), so it fetches in large, lazy batches:
    # one fetch per 100 ms at most, not one per record the worker produces, on the broker that it measures.
    consumer = Consumer(librdkafka_config(cfg, **{"group.id": f"demo-{os.getpid()}", "enable.auto.commit": False,
                                                  "fetch.min.bytes": 1 << 20, "fetch.wait.max.ms": 100}))
    ends = [TopicPartition(topic, p, end)
            for p, end in high_watermarks(consumer, topic, topic_partitions(consumer, topic)).items()]
    consumer.assign(ends)  # only what this run produces
    titles = titles or {}
    shown = 3 if titles else 5  # titles make a line long
    seen: list[dict[str, int]] = []
    t0 = last_print = time.monotonic()
    try:
        while len(seen) < expect() and time.monotonic() - t0 < timeout_s:
            for msg in consumer.consume(num_messages=1000, timeout=0.5):
                if msg.error():
                    continue
                rec = json.loads(msg.value())
                seen.append(timestamps(rec))
                if last_users is not None:
                    last_users[:] = [*(u for u in last_users[-9:] if u != rec["user_id"]), rec["user_id"]]
                if time.monotonic() - last_print >= 1.0:
                    last_print = time.monotonic()
                    ms = rec["emitted_ts"] - rec["kafka_ts"] if rec.get("kafka_ts") else 0
                    log(f"  [{len(seen):>7} recs, {ms:6.1f} ms] user {rec['user_id']} "
                        f"(model {rec['model_version']}) -> {format_items(rec['items'][:shown], titles)}")
            if on_read is not None:
                on_read(len(seen))
    finally:
        consumer.close()
    return seen


def run_demo(cfg: Config, config: Path | None, overrides: list[str], data: str | None, events: int, rate: float,
             train_minutes: float, log: Callable[[str], None] = print, warm_up_s: float = 5.0) -> None:
    """Replay ``rate * warm_up_s`` warm-up events, then ``events`` timed ones, at ``rate`` in one paced stream;
    the warm-up events are served like the rest, and the summary reports them on a line of their own."""
    from lrustream.broker import LocalCluster
    from lrustream.replay import replay
    from stream.topics import create_topics

    workdir = resolve_path(".lrustream/demo")
    workdir.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("LRUSTREAM_KAFKA_BOOTSTRAP"):
        for status in LocalCluster.from_config(cfg).start():
            log("broker: " + status.line())
    create_topics(cfg)
    data = pick_data(data, workdir, log)
    version = ensure_model(cfg, data, train_minutes, log)
    titles, titles_file = load_titles(data)
    if titles_file is not None:
        log(f"titles: {len(titles)} from {titles_file}")
    log_path = workdir / "worker.log"
    proc = start_worker(config, overrides, log_path)
    try:
        wait_healthy(cfg, proc, log_path)
        log(f"worker: serving {version}; metrics at http://{cfg.http.host}:{cfg.http.port}/metrics; log {log_path}")
        warm_up = int(rate * warm_up_s)
        log(f"replay: {warm_up} warm-up and {events} timed events of {data} at {rate:g} events/s, "
            f"in global time order")
        sent: list[int] = []
        total = warm_up + events
        producer = threading.Thread(target=lambda: sent.append(replay(cfg, data, rate, total, False)), daemon=True)
        marks: dict[str, Buckets] = {}  # the worker's histograms once the warm-up's recommendations are read

        def mark(read: int) -> None:
            if read >= warm_up and "timed" not in marks:
                marks["timed"] = scrape_histograms(cfg)

        started = time.monotonic()
        producer.start()
        # until the replay ends it may send all of them; then exactly what it sent (the data may hold fewer)
        last_users: list[str] = []
        records = watch(cfg, lambda: sent[0] if sent else total, timeout_s=total / rate + 120, log=log,
                        last_users=last_users, on_read=mark, titles=titles)
        producer.join(timeout=5)
        summarise(records, sent[0] if sent else 0, time.monotonic() - started, log, warm_up)
        if in_worker := worker_stages(marks.get("timed", {}), settled_histograms(cfg)):
            log(f"  in the worker, timed events (its histograms from the warm-up's last recommendation on; bucket "
                f"upper bounds): {format_worker_stages(in_worker)}")
        ask(cfg, [*last_users[-2:], "a-user-never-seen"], log, titles)
    finally:
        stop([proc])
    log("done. The broker keeps running (lrustream broker stop); re-run `make demo` any time.")


def ask(cfg: Config, users: list[str], log: Callable[[str], None], titles: dict[str, str] | None = None) -> None:
    """Ask the worker for each user's top-5 now, as an application would (lrustream.client): the demo asks for
    the users served last and for one it has never seen (the popular fallback). Items show with their
    ``titles`` where known."""
    from lrustream.client import Client

    with Client(cfg) as client:
        for user in users:
            started = time.perf_counter()
            answer = client.recommend(user, k=5)
            took_ms = (time.perf_counter() - started) * 1000
            items = format_items(answer["items"], titles or {})
            how = f"popular fallback: {items}" if answer.get("fallback") else (
                f"{items} (model {answer['model_version']})")
            log(f"request: GET /recommendations/{user}?k=5 -> {how} in {took_ms:.1f} ms")


def summarise(records: list[dict[str, int]], sent: int, seconds: float, log: Callable[[str], None],
              warm_up: int = 0) -> None:
    """The summary: total latency p50 / p99 / p99.9 of the timed events and, when the records carry received_ts,
    the split by stage; then the same for the first ``warm_up`` events (by kafka_ts, the order they were sent
    in), which the figures above leave out: a broker and a worker that have just started are still compiling
    and loading their hot paths, which no long-running deployment pays on every event."""
    if not records:
        log("no recommendations arrived (see .lrustream/demo/worker.log)")
        return
    ordered = sorted(records, key=lambda r: r.get("kafka_ts", 0))
    warm, timed = ordered[:warm_up], ordered[warm_up:]
    summary = stage_percentiles(latency_stages(timed))
    latency = format_stages(summary, ["total"]) if summary else "unknown (no record carries kafka_ts)"
    split = f" ({min(warm_up, sent)} warm-up, then {max(sent - warm_up, 0)} timed)" if warm_up else ""
    timed_only = " of the timed events" if warm_up else ""
    log(f"summary: {sent} events published{split}, {len(records)} recommendations in {seconds:.1f} s; "
        f"event-to-recommendation latency{timed_only} {latency}")
    if "queueing" in summary:
        log(f"  by stage: {format_stages(summary, ['queueing', 'processing'])}")
    cold = stage_percentiles(latency_stages(warm))
    if cold:
        log(f"  warm-up (the first {len(warm)} events, served while the broker and the worker warm up; "
            f"left out above): {format_stages(cold)}")
