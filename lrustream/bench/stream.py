"""Streaming benchmark (``lrustream bench stream``): how far one worker is from the ceiling of the stack, and
its event-to-recommendation latency at steady rates.

Throughput. Three contenders each drain the same pre-loaded replay (``--events``) from their own topics on the
same broker: a plain confluent-kafka forwarder (:func:`forwarder`: poll, then ``consume(n, 0)``, each record
produced unchanged), a bare Faust agent that only forwards (:func:`bare_agent`), and one worker. Each one's
events/s is its output records' count over their broker-timestamp span, identically for all three, so process
start-up and group joins are excluded. The worker's figure is reported as a ratio to both: the forwarder is
the ceiling of any Python Kafka client here, the bare agent that of the Faust stack the worker is built on.

Latency. After its drain the worker gets fresh events at each ``--latency-rates`` rate in turn (default 1,000,
2,000 and 5,000 events/s, ``--latency-seconds`` each). A phase counts the recommendations of its own events
(kafka_ts at or after the phase's start) that come out within ``--latency-wait`` seconds of its replay's end;
an event with none by then counts as infinitely late (a percentile that reaches it reads "unserved"), so a rate
the worker cannot keep up with is never flattered. Each phase reports p50, p99 and p99.9 of the total
(emitted_ts - kafka_ts) and, when the records carry received_ts, of queueing (received_ts - kafka_ts) and
processing (emitted_ts - received_ts), then the worker's own histograms over the phase (its model step per
micro-batch, each recommendation's produce-to-ack time, its commits; lrustream/children.py); a phase also says
how many events of earlier phases were still queued when it started.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any

from confluent_kafka import Consumer, Producer

from lrustream.children import (
    QUANTILES,
    STAGES,
    WORKER_STAGE_FIGURES,
    WORKER_STAGES,
    Buckets,
    format_stages,
    format_worker_stages,
    latency_stages,
    settled_histograms,
    spawn,
    spawn_cli,
    stage_percentiles,
    stop,
    timestamps,
    worker_stages,
)
from lrustream.kernel.config import Config, load_config
from lrustream.kernel.kafka import admin, client_logger, flush, librdkafka_config, produce, producer_config

CONTENDERS = ("forwarder", "bare", "worker")
LATENCY_RATES = (1_000.0, 2_000.0, 5_000.0)
RUN_PREFIX = "bench-"  # of every topic and group a run names (topic_overrides); drop_topics deletes only these
Log = Callable[[str], None]


def bare_agent(cfg: Config) -> None:
    """A Faust agent that forwards each input record unchanged to the recommendations topic."""
    import faust

    from lrustream.kernel.kafka import faust_broker_settings

    datadir = Path(cfg.state.dir).resolve() / "bare"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(f"{cfg.stream.app_id}-bare", **faust_broker_settings(cfg), web_enabled=False,
                    topic_allow_declare=False, topic_disable_leader=True, consumer_auto_offset_reset="earliest",
                    datadir=str(datadir), store="memory://")
    source = app.topic(cfg.topics.interactions, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw")
    sink = app.topic(cfg.topics.recommendations, key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw")

    @app.agent(source)
    async def forward(stream: faust.StreamT) -> None:
        async for key, value in stream.items():
            await sink.send(key=key, value=value)

    faust.Worker(app, loglevel="warning").execute_from_commandline()


def forwarder(cfg: Config, batch: int = 5_000) -> None:
    """A plain confluent-kafka consumer and producer forwarding each input record (key, value, headers)
    unchanged to the recommendations topic until SIGTERM: wait for one record, take what else is already
    fetched without waiting, produce them all (:func:`lrustream.kernel.kafka.produce`), serve deliveries."""
    consumer = Consumer(librdkafka_config(cfg, logger=client_logger(), **{
        "group.id": f"{cfg.stream.app_id}-forwarder", "auto.offset.reset": "earliest"}))
    producer = Producer(producer_config(cfg, logger=client_logger()))
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    consumer.subscribe([cfg.topics.interactions])
    try:
        while not stopping:
            first = consumer.poll(0.5)
            if first is None:
                producer.poll(0)
                continue
            for msg in [first, *consumer.consume(batch, 0)]:
                if not msg.error():  # no timestamp passed: the output's CreateTime is when it was forwarded
                    produce(producer, cfg.topics.recommendations, msg.value(), msg.key(), headers=msg.headers())
            producer.poll(0)
    finally:
        flush(producer, 10)
        consumer.close()


class Output:
    """Reads a contender's output topic from its start, for the whole run: every record's broker timestamp
    and, while :meth:`watch` is set, the latency timestamps of the records produced for events at or after it."""

    def __init__(self, cfg: Config) -> None:
        self.consumer = Consumer(librdkafka_config(cfg, **{
            "group.id": f"bench-{uuid.uuid4().hex[:6]}", "auto.offset.reset": "earliest",
            "enable.auto.commit": False}))
        self.consumer.subscribe([cfg.topics.recommendations])
        self.stamps: list[int] = []
        self.since_ms: int | None = None
        self.records: list[dict[str, int]] = []

    def watch(self, since_ms: int) -> None:
        """From now on keep the records whose input event was produced at or after ``since_ms`` (only those)."""
        self.since_ms, self.records = since_ms, []

    def read(self, expect: int, timeout_s: float) -> int:
        """Read until ``expect`` records in all have come out, or ``timeout_s``; returns how many have."""
        deadline = time.monotonic() + timeout_s
        while len(self.stamps) < expect and time.monotonic() < deadline:
            for msg in self.consumer.consume(num_messages=5000, timeout=0.5):
                if not msg.error():
                    self._keep(msg)
        return len(self.stamps)

    def _keep(self, msg: Any) -> None:
        self.stamps.append(msg.timestamp()[1])
        if self.since_ms is None:
            return
        try:
            rec = timestamps(json.loads(msg.value()))
        except ValueError:
            return
        if rec.get("kafka_ts", -1) >= self.since_ms:
            self.records.append(rec)

    def rate(self) -> float:
        """Records per second over their broker-timestamp span (nan for fewer than two, or no span)."""
        span = (max(self.stamps) - min(self.stamps)) / 1000 if len(self.stamps) > 1 else 0.0
        return len(self.stamps) / span if span else float("nan")

    def close(self) -> None:
        self.consumer.close()


def topic_overrides(base: list[str], tag: str, tmp: Path) -> list[str]:
    """``base`` plus topics, consumer group, state and model store of one benchmark run's own (named by ``tag``)."""
    run = f"{RUN_PREFIX}{tag}"
    return [*base, f"topics.interactions={run}-in", f"topics.recommendations={run}-out",
            f"topics.dlq={run}-dlq", f"topics.state_changelog={run}-changelog",
            f"topics.training_examples={run}-train", f"topics.model_updates={run}-updates",
            f"topics.items={run}-items", f"topics.model_versions={run}-versions",
            f"stream.app_id={run}", f"state.dir={tmp / 'state'}", f"model_store.dir={tmp / 'models'}",
            "stream.unknown_items=oov"]


def drop_topics(cfg: Config, log: Log) -> None:
    """Delete the topics of one benchmark run (named by :func:`topic_overrides`) when it is done with them: a
    broker that runs the benchmarks again and again would otherwise carry hundreds of them, and its
    garbage-collection pauses grow with that. Refuses any name not made by ``topic_overrides``; a failure is
    reported, not raised: the figures stand."""
    from stream.topics import topic_specs

    names = [spec.name for spec in topic_specs(cfg)]
    if not all(name.startswith(RUN_PREFIX) for name in names):
        raise ValueError(f"not a benchmark's own topics, not deleted: {names}")
    client = admin(cfg)  # held until the answers are in: a client that is gone fails its futures
    try:
        for future in client.delete_topics(names, operation_timeout=30).values():
            future.result()
    except Exception as exc:
        log(f"the benchmark's topics {cfg.topics.interactions} and the rest were not all deleted: {exc}")


def publish_random_model(cfg: Config, data: str) -> None:
    """Serving cost does not depend on training, so an untrained model with the data's vocabulary suffices."""
    import torch

    from models import build_model, model_config
    from stream.versions import publish_version
    from trainer.data import load_sequences

    vocab = load_sequences(data).vocabulary()
    torch.manual_seed(0)
    model = build_model(model_config(cfg.model), len(vocab))
    publish_version(cfg, model, vocab, who="bench")


@dataclass(frozen=True)
class LatencyPlan:
    """The latency phases: one per rate (events/s), ``seconds`` of replay each, then at most ``wait_s`` more for
    their recommendations."""

    rates: tuple[float, ...] = LATENCY_RATES
    seconds: float = 10.0
    wait_s: float = 10.0


def latency_plan(rates: str, seconds: float, wait_s: float) -> LatencyPlan:
    """The plan the options describe (``rates`` "1000,2000,5000"); ValueError naming the option at fault."""
    try:
        parsed = tuple(float(x) for x in rates.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--latency-rates must be numbers separated by commas, got {rates!r}") from None
    if not parsed or not all(0 < r < math.inf for r in parsed):
        raise ValueError(f"--latency-rates must be positive events/s, got {rates!r}")
    if seconds <= 0 or wait_s < 0:
        raise ValueError(f"--latency-seconds must be positive and --latency-wait not negative, got {seconds:g} "
                         f"and {wait_s:g}")
    return LatencyPlan(parsed, seconds, wait_s)


def input_rate(records: list[dict[str, int]]) -> float:
    """Events/s actually produced, from the served records' kafka_ts span (the replay forgives stalls rather
    than catching up in a burst, so on a busy machine this can fall short of the rate asked for)."""
    stamps = [r["kafka_ts"] for r in records if "kafka_ts" in r]
    span_s = (max(stamps) - min(stamps)) / 1000 if len(stamps) > 1 else 0.0
    return (len(stamps) - 1) / span_s if span_s else float("nan")


def phase_figures(rate: float, stages: dict[str, list[float]], sent: int, input_per_s: float,
                  backlog: int, in_worker: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """One latency phase as flat results: ``worker_<rate>_{sent,input_per_s,served,backlog}``,
    ``worker_<rate>_<stage>_<p50|p99|p99.9>_ms`` for the stages present (inf: reached unserved events) and
    ``worker_<rate>_in_<key>_{p50_ms,p99_ms,count}`` for the worker's histograms (``in_worker``)."""
    served = len(stages["total"])
    prefix = f"worker_{rate:g}_"
    out = {prefix + "sent": float(sent), prefix + "input_per_s": input_per_s, prefix + "served": float(served),
           prefix + "backlog": float(backlog)}
    for stage, figures in stage_percentiles(stages, unserved=max(0, sent - served)).items():
        out.update({f"{prefix}{stage}_{name}_ms": figures[name] for name, _ in QUANTILES})
    for key, figures in (in_worker or {}).items():
        out.update({f"{prefix}in_{key}_{name}": value for name, value in figures.items()})
    return out


def phase_lines(rate: float, figures: dict[str, float], wait_s: float) -> list[str]:
    """What a phase prints: counts and total latency, then the per-stage split when there is one."""
    prefix = f"worker_{rate:g}_"
    summary = {stage: {name: figures[f"{prefix}{stage}_{name}_ms"] for name, _ in QUANTILES}
               for stage in STAGES if f"{prefix}{stage}_p50_ms" in figures}
    sent, served, backlog = (int(figures[prefix + k]) for k in ("sent", "served", "backlog"))
    lines = [f"worker @ {rate:,.0f} events/s (served input at {figures[prefix + 'input_per_s']:,.0f}/s): {sent} "
             f"events sent ({backlog} earlier ones still queued), {served} served within {wait_s:g} s of the last",
             f"  latency {format_stages(summary, ['total'])}" if summary else "  latency: no records"]
    if "queueing" in summary:
        lines.append(f"  by stage: {format_stages(summary, ['queueing', 'processing'])}")
    in_worker = {key: {name: figures[f"{prefix}in_{key}_{name}"] for name in WORKER_STAGE_FIGURES}
                 for key, _, _ in WORKER_STAGES if f"{prefix}in_{key}_count" in figures}
    if in_worker:
        lines.append(f"  in the worker (its histograms; bucket upper bounds): {format_worker_stages(in_worker)}")
    return lines


def latency_phase(cfg: Config, data: str, output: Output, rate: float, plan: LatencyPlan,
                  sent_before: int, histograms: Buckets) -> tuple[int, dict[str, float], Buckets]:
    """Replay ``rate * plan.seconds`` fresh events at ``rate`` (the data set's first events, once more) and read
    their recommendations until all are out or ``plan.wait_s`` after the replay; returns (events sent, figures,
    the worker's histograms after the phase). ``histograms``: the worker's histograms, settled, before it."""
    from lrustream.replay import replay

    backlog = max(0, sent_before - len(output.stamps))  # as of the end of the previous wait
    since = int(time.time() * 1000)
    output.watch(since)
    sent = replay(cfg, data, rate, max(1, round(rate * plan.seconds)), False)
    output.read(sent_before + sent, plan.wait_s)
    stages = latency_stages(output.records, since)
    after = settled_histograms(cfg)
    in_worker = worker_stages(histograms, after)
    return sent, phase_figures(rate, stages, sent, input_rate(output.records), backlog, in_worker), after


def latency_phases(cfg: Config, data: str, output: Output, plan: LatencyPlan, sent_before: int,
                   log: Log) -> dict[str, float]:
    results: dict[str, float] = {}
    histograms = settled_histograms(cfg)  # without the acks of the drain's outputs (its last were 10-500 ms)
    for rate in plan.rates:  # each phase starts from the settled histograms the one before ended with
        sent, figures, histograms = latency_phase(cfg, data, output, rate, plan, sent_before, histograms)
        sent_before += sent
        results.update(figures)
        for line in phase_lines(rate, figures, plan.wait_s):
            log(line)
    return results


def start(kind: str, cfg: Config, overrides: list[str], data: str, tmp: Path) -> Popen:
    if kind == "worker":
        publish_random_model(cfg, data)
        return spawn_cli(["worker", "--loglevel", "warning", *overrides], tmp / "log")
    return spawn(["-m", "lrustream.bench.stream", kind, *overrides], tmp / "log")


def contender(kind: str, base: list[str], data: str, events: int, workdir: Path, plan: LatencyPlan,
              log: Log, used: list[Config]) -> dict[str, float]:
    """Pre-load ``events`` on fresh topics, start ``kind``, measure its drain (and, for the worker, latency);
    the configuration naming its topics is appended to ``used``."""
    from lrustream.replay import replay
    from stream.topics import create_topics

    tag = f"{kind}-{uuid.uuid4().hex[:6]}"
    tmp = workdir.resolve() / tag
    tmp.mkdir(parents=True, exist_ok=True)
    overrides = topic_overrides(base, tag, tmp)
    cfg = load_config(overrides=overrides)
    used.append(cfg)
    create_topics(cfg)
    sent = replay(cfg, data, None, events, False)
    proc = start(kind, cfg, overrides, data, tmp)
    output = Output(cfg)
    try:
        n = output.read(sent, timeout_s=sent / 500 + 120)
        results = {f"{kind}_events_per_s": output.rate()}
        log(f"{kind:9s}: {n} of {sent} events out, {results[f'{kind}_events_per_s']:,.0f} events/s "
            f"(drain of a pre-loaded topic)")
        if kind == "worker":
            results.update(latency_phases(cfg, data, output, plan, sent, log))
        return results
    finally:
        output.close()
        stop([proc])


def ratios(results: dict[str, float], log: Log) -> dict[str, float]:
    worker, bare, fwd = (results[f"{k}_events_per_s"] for k in ("worker", "bare", "forwarder"))
    out = {"worker_vs_forwarder": worker / fwd, "worker_vs_bare": worker / bare, "bare_vs_forwarder": bare / fwd}
    log(f"worker throughput: {out['worker_vs_forwarder']:.0%} of the plain forwarder, "
        f"{out['worker_vs_bare']:.0%} of the bare Faust agent (which is {out['bare_vs_forwarder']:.0%} of the "
        f"forwarder)")
    return out


def run(base: list[str], data: str, events: int, workdir: Path, plan: LatencyPlan = LatencyPlan(),
        log: Log = print) -> dict[str, float]:
    """The whole benchmark (module docstring); returns every figure it printed, by name."""
    results: dict[str, float] = {}
    used: list[Config] = []
    try:
        for kind in CONTENDERS:
            results.update(contender(kind, base, data, events, workdir, plan, log, used))
    finally:  # at the end, not between contenders: the broker removes a deleted topic's files a minute later
        for cfg in used:
            drop_topics(cfg, log)
    results.update(ratios(results, log))
    return results


if __name__ == "__main__":
    {"bare": bare_agent, "forwarder": forwarder}[sys.argv[1]](load_config(overrides=sys.argv[2:]))
