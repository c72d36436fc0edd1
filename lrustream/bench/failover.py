"""Failover benchmark (``lrustream bench failover``): how long recommendations stop when a broker of a
three-node cluster dies, under a steady stream.

The benchmark starts a cluster of its own (three local nodes on free ports, under ``<workdir>/cluster``), one
worker serving an untrained model of the data set's vocabulary, and a replay of the data set at ``--rate``
events/s that runs for the whole benchmark. After ``--settle`` seconds of steady serving it kills nodes
(SIGKILL) in a loop, ``--rounds`` times per fault kind, each node down for ``--down`` seconds, started again,
and the cluster back to every replica in sync before the next fault:

- ``input-leader``: the leader of the input topic's partition 0;
- ``transaction-coordinator``: the leader of the transaction state log, which coordinates the worker's
  changelog transactions;
- ``controller``: the active controller of the KRaft quorum.

A reader follows the recommendations topic throughout. For each fault, at kill time T:

- **flowing again after**: for every input partition, the first recommendation emitted after T for an event
  produced after T; the latest of these, minus T. A fault that stops nothing reads as one event's latency.
- **p99 < LATENCY_MS again after**: events are grouped by the second they were produced in; the end of the last
  one-second group, up to the next fault, whose p99 event-to-recommendation latency is LATENCY_MS or more (or
  that has an event never served), minus T; 0 when none is.
- **events delayed**: events produced from T - 1 s until the next fault whose latency exceeded one second.
- **role moved**: the seconds until another node held the killed node's role (the partition's leadership, the
  coordinator, the active controller), polled while the node is down: how long the cluster itself took to
  fail over (a crashed broker's roles move when the controller has missed its heartbeats for Kafka's
  ``broker.session.timeout.ms``, 9 s by default); blank when the role did not move before the node came back.

Steady state before the first fault is reported alike (p50, p99), and events lost (never recommended) at the
end. Per kind the figures are p50 and max over its rounds.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer

from lrustream.broker import LocalCluster
from lrustream.children import percentile, spawn_cli, stop, wait_healthy
from lrustream.kernel.config import Config, load_config
from lrustream.kernel.kafka import admin, librdkafka_config

Log = Callable[[str], None]
KINDS = ("input-leader", "transaction-coordinator", "controller")
LATENCY_MS = 50.0
DELAYED_MS = 1000.0


@dataclass
class Served:
    """What the reader saw: per input (partition, offset) the event's produce time and its first
    recommendation's emit time, both in ms."""

    first: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Reader(threading.Thread):
    """Follows the recommendations topic from its start until stopped."""

    def __init__(self, cfg: Config, served: Served) -> None:
        super().__init__(daemon=True)
        self.consumer = Consumer(librdkafka_config(cfg, **{
            "group.id": f"bench-failover-{uuid.uuid4().hex[:6]}", "auto.offset.reset": "earliest",
            "enable.auto.commit": False}))
        self.consumer.subscribe([cfg.topics.recommendations])
        self.served = served
        self.done = threading.Event()

    def run(self) -> None:
        try:
            while not self.done.is_set():
                for msg in self.consumer.consume(num_messages=5000, timeout=0.2):
                    if not msg.error():
                        self._keep(msg.value())
        finally:
            self.consumer.close()

    def _keep(self, value: bytes) -> None:
        try:
            rec = json.loads(value)
            key = (int(rec["source"]["partition"]), int(rec["source"]["offset"]))
            stamps = (int(rec["kafka_ts"]), int(rec["emitted_ts"]))
        except (ValueError, KeyError, TypeError):
            return
        with self.served.lock:
            self.served.first.setdefault(key, stamps)


def leader_of(cfg: Config, topic: str, partition: int = 0) -> int:
    return admin(cfg).list_topics(topic, timeout=10).topics[topic].partitions[partition].leader


def victim(kind: str, cluster: LocalCluster, cfg: Config) -> int:
    """The node a fault of ``kind`` kills now."""
    if kind == "input-leader":
        return leader_of(cfg, cfg.topics.interactions)
    if kind == "transaction-coordinator":
        return leader_of(cfg, "__transaction_state")
    node = cluster.active_controller()
    if node is None:
        raise RuntimeError("no active controller known")
    return node


def wait_in_sync(cfg: Config, timeout_s: float = 120.0) -> float:
    """Seconds until every partition of the cluster has all its replicas in sync."""
    t0 = time.monotonic()
    while time.monotonic() < t0 + timeout_s:
        topics = admin(cfg).list_topics(timeout=10).topics
        if all(len(p.isrs) == len(p.replicas) for t in topics.values() for p in t.partitions.values()):
            return time.monotonic() - t0
        time.sleep(0.5)
    raise RuntimeError(f"replicas still out of sync {timeout_s:.0f} s after the node came back")


@dataclass
class Fault:
    kind: str
    node: int
    killed_ms: int
    until_ms: int = 0  # the next fault's kill (or the end of the run)
    moved_s: float = float("nan")  # seconds until another node held the killed one's role (nan: not while down)


def wait_moved(kind: str, node: int, cluster: LocalCluster, cfg: Config, within_s: float) -> float:
    """Seconds from now until a node other than ``node`` holds its role (leader, coordinator, controller), polled
    every 0.2 s for at most ``within_s``; nan when the role did not move meanwhile."""
    t0 = time.monotonic()
    while time.monotonic() < t0 + within_s:
        try:
            holder = victim(kind, cluster, cfg)
        except Exception:  # metadata from a cluster in the middle of an election: ask again
            holder = node
        if holder not in (node, -1):
            return time.monotonic() - t0
        time.sleep(0.2)
    return float("nan")


def fault_figures(fault: Fault, events: list[tuple[int, int, int | None]], partitions: int) -> dict[str, float]:
    """Figures of one fault (module docstring) from (partition, produced ms, emitted ms or None) per event."""
    t, end = fault.killed_ms, fault.until_ms
    back: dict[int, int] = {}
    for partition, produced, emitted in events:
        if produced >= t and emitted is not None and emitted >= t:
            back[partition] = min(back.get(partition, emitted), emitted)
    flowing = (max(back.values()) - t) / 1000 if len(back) == partitions else float("inf")
    by_second: dict[int, list[float]] = defaultdict(list)
    delayed = 0
    for _, produced, emitted in events:
        if t - 1000 <= produced < end:
            latency = float("inf") if emitted is None else emitted - produced
            delayed += latency > DELAYED_MS
            if produced >= t:
                by_second[(produced - t) // 1000].append(latency)
    slow = [s for s, lat in by_second.items() if percentile(lat, 0.99) >= LATENCY_MS]
    return {"flowing_s": flowing, "p99_back_s": float(max(slow) + 1) if slow else 0.0, "delayed": delayed}


def steady_figures(events: list[tuple[int, int, int | None]], start_ms: int, end_ms: int) -> dict[str, float]:
    latencies = [e - p for _, p, e in events if start_ms <= p < end_ms and e is not None]
    return {"p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99), "events": len(latencies)}


def snapshot(served: Served, sent: dict[tuple[int, int], int]) -> list[tuple[int, int, int | None]]:
    """(partition, produced ms, first emitted ms or None) of every event delivered to the input topic."""
    with served.lock:
        first = dict(served.first)
    return [(key[0], produced, first[key][1] if key in first else None) for key, produced in sent.items()]


class Replay(threading.Thread):
    """The data set at ``rate`` events/s, in a loop, until stopped; records each delivered event's input
    partition, offset and produce time."""

    def __init__(self, cfg: Config, data: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.cfg, self.data, self.rate = cfg, data, rate
        self.sent: dict[tuple[int, int], int] = {}  # (partition, offset) -> produce time, ms
        self.done = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        from confluent_kafka import Producer

        from lrustream.kernel.kafka import produce, producer_config
        from lrustream.replay import Pacer, pace
        from stream.events import encode_event
        from trainer.data import load_sequences

        producer = Producer(producer_config(self.cfg, **{"linger.ms": 1}))
        pacer = Pacer(self.rate)
        events = list(load_sequences(self.data).events())
        try:
            while not self.done.is_set():
                for user, item, ts_ms in events:
                    if self.done.is_set():
                        break
                    key, value = encode_event(user, item, ts_ms)
                    pace(producer, pacer.wait_s())
                    produce(producer, self.cfg.topics.interactions, value, key, on_delivery=self._delivered,
                            poll_s=0.1)
        except Exception as exc:  # reported by the benchmark, which then stops
            self.error = exc
        finally:
            producer.flush(60)

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is None:
            self.sent[(msg.partition(), msg.offset())] = msg.timestamp()[1]


def run(base: list[str], data: str, rate: float, rounds: int, down_s: float, settle_s: float, workdir: Path,
        log: Log = print) -> dict[str, float]:
    """The whole benchmark (module docstring); returns every figure it printed, by name."""
    from lrustream.bench.stream import publish_random_model, topic_overrides
    from stream.topics import create_topics

    workdir = workdir.resolve() / "failover"
    shutil.rmtree(workdir, ignore_errors=True)
    cluster = LocalCluster.on_free_ports(workdir / "cluster", Path(load_config(overrides=base).broker.jars_dir),
                                         nodes=3)
    log("cluster: starting three nodes")
    cluster.start()
    overrides = [*topic_overrides([*base, f"kafka.bootstrap_servers={cluster.bootstrap}"], "failover", workdir)]
    cfg = load_config(overrides=overrides)
    procs = []
    try:
        create_topics(cfg)
        publish_random_model(cfg, data)
        log_path = workdir / "worker.log"
        procs.append(spawn_cli(["worker", "--loglevel", "warning", *overrides], log_path))
        wait_healthy(cfg, procs[0], log_path)
        return _measure(cluster, cfg, data, rate, rounds, down_s, settle_s, log)
    finally:
        stop(procs)
        cluster.stop()


def _measure(cluster: LocalCluster, cfg: Config, data: str, rate: float, rounds: int, down_s: float,
             settle_s: float, log: Log) -> dict[str, float]:
    served = Served()
    reader, replay = Reader(cfg, served), Replay(cfg, data, rate)
    reader.start()
    replay.start()
    faults: list[Fault] = []
    try:
        time.sleep(settle_s)
        steady_from = int(time.time() * 1000) - int(settle_s * 1000 / 2)
        for _ in range(rounds):
            for kind in KINDS:
                node = victim(kind, cluster, cfg)
                killed = int(time.time() * 1000)
                if faults:
                    faults[-1].until_ms = killed
                cluster.kill(node)
                fault = Fault(kind, node, killed)
                faults.append(fault)
                fault.moved_s = wait_moved(kind, node, cluster, cfg, down_s)
                time.sleep(max(0.0, killed / 1000 + down_s - time.time()))
                cluster.start(node)
                in_sync = wait_in_sync(cfg)
                moved = "did not move while it was down" if math.isnan(fault.moved_s) else \
                    f"moved to another node after {fault.moved_s:.1f} s"
                log(f"{kind}: killed node {node}; its role {moved}; started again after {down_s:.0f} s, replicas "
                    f"in sync {in_sync:.1f} s later")
                time.sleep(settle_s)
                if replay.error is not None:
                    raise RuntimeError(f"the replay failed: {replay.error}")
        faults[-1].until_ms = int(time.time() * 1000)
    finally:
        replay.done.set()
        replay.join(120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(served.first) < len(replay.sent):
        time.sleep(0.5)
    reader.done.set()
    reader.join(30)
    events = snapshot(served, replay.sent)
    partitions = cfg.topics.partitions
    return report(faults, events, partitions, steady_from, faults[0].killed_ms if faults else steady_from, log)


def report(faults: list[Fault], events: list[tuple[int, int, int | None]], partitions: int, steady_from: int,
           steady_to: int, log: Log) -> dict[str, float]:
    results: dict[str, float] = {}
    steady = steady_figures(events, steady_from, steady_to)
    log(f"steady before the faults: p50 {steady['p50_ms']:.0f} ms, p99 {steady['p99_ms']:.0f} ms "
        f"({steady['events']:.0f} events)")
    results.update({f"steady_{k}": v for k, v in steady.items()})
    per_kind: dict[str, list[dict[str, float]]] = defaultdict(list)
    for fault in faults:
        per_kind[fault.kind].append({**fault_figures(fault, events, partitions), "moved_s": fault.moved_s})
    log(f"{'fault':24s} {'rounds':>6s} {'role moved (s)':>15s} {'flowing again (s)':>18s} "
        f"{'p99<' + str(int(LATENCY_MS)) + 'ms again (s)':>19s} {'delayed >1 s':>13s}   (each p50 / max)")
    for kind, figures in per_kind.items():
        cols = []
        for name in ("moved_s", "flowing_s", "p99_back_s", "delayed"):
            values = [f[name] for f in figures if not math.isnan(f[name])] or [float("nan")]
            p50, top = percentile(values, 0.5), max(values)
            results[f"{kind}_{name}_p50"], results[f"{kind}_{name}_max"] = p50, top
            if math.isnan(top):
                cols.append("-")
            else:
                cols.append(f"{p50:.1f} / {top:.1f}" if name != "delayed" else f"{p50:.0f} / {top:.0f}")
        log(f"{kind:24s} {len(figures):6d} {cols[0]:>15s} {cols[1]:>18s} {cols[2]:>19s} {cols[3]:>13s}")
    lost = sum(1 for _, _, emitted in events if emitted is None)
    results["events"], results["lost"] = len(events), lost
    log(f"events: {len(events)} delivered to the input topic, {lost} without a recommendation at the end")
    return results
