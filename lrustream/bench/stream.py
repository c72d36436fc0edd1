"""Streaming benchmark: one worker draining a replayed data set vs a bare Faust agent that only forwards
events (the ceiling of the stack on the same broker), then latency at a steady sub-saturation rate.

Throughput is measured from the output records' broker timestamps (count / span), identically for both,
so process start-up and group joins are excluded. Run: ``lrustream bench stream``.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Consumer

from lrustream.children import percentile, spawn, spawn_cli, stop
from lrustream.kernel.config import Config, load_config
from lrustream.kernel.kafka import librdkafka_config


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


def output_stats(cfg: Config, expect: int, timeout_s: float, since_ms: int = 0) -> tuple[int, float, list[float]]:
    """(records, records/s over their broker-timestamp span, event-to-recommendation latencies in s of the
    records whose input event was produced at or after ``since_ms``)."""
    topic = cfg.topics.recommendations
    consumer = Consumer(librdkafka_config(cfg, **{"group.id": f"bench-{uuid.uuid4().hex[:6]}",
                                                  "auto.offset.reset": "earliest", "enable.auto.commit": False}))
    consumer.subscribe([topic])
    stamps: list[int] = []
    latencies: list[float] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(stamps) < expect and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=5000, timeout=0.5):
                if msg.error():
                    continue
                stamps.append(msg.timestamp()[1])
                try:
                    rec = json.loads(msg.value())
                    if isinstance(rec, dict) and rec.get("kafka_ts") and rec["kafka_ts"] >= since_ms:
                        latencies.append((rec["emitted_ts"] - rec["kafka_ts"]) / 1000)
                except ValueError:
                    pass
    finally:
        consumer.close()
    span = (max(stamps) - min(stamps)) / 1000 if len(stamps) > 1 else float("nan")
    return len(stamps), len(stamps) / span if span else float("nan"), latencies


def _overrides(base: list[str], tag: str, tmp: Path) -> list[str]:
    return [*base, f"topics.interactions=bench-{tag}-in", f"topics.recommendations=bench-{tag}-out",
            f"topics.dlq=bench-{tag}-dlq", f"topics.state_changelog=bench-{tag}-changelog",
            f"topics.training_examples=bench-{tag}-train", f"topics.model_updates=bench-{tag}-updates",
            f"stream.app_id=bench-{tag}", f"state.dir={tmp / 'state'}", f"model_store.dir={tmp / 'models'}",
            "stream.unknown_items=oov"]


def publish_random_model(cfg: Config, data: str) -> None:
    """Serving cost does not depend on training, so an untrained model with the data's vocabulary suffices."""
    import torch

    from models import build_model, model_config
    from models.store import ModelStore
    from trainer.data import load_sequences

    vocab = load_sequences(data).vocabulary()
    torch.manual_seed(0)
    model = build_model(model_config(cfg.model), len(vocab))
    ModelStore(cfg.model_store.dir).publish(model, vocab)


def run(base: list[str], data: str, events: int, latency_rate: float, latency_events: int, workdir: Path,
        log: Callable[[str], None] = print) -> dict[str, float]:
    from lrustream.replay import replay
    from stream.topics import create_topics

    results: dict[str, float] = {}
    for kind in ("bare", "worker"):
        tag = f"{kind}-{uuid.uuid4().hex[:6]}"
        tmp = workdir.resolve() / tag
        tmp.mkdir(parents=True, exist_ok=True)
        overrides = _overrides(base, tag, tmp)
        cfg = load_config(overrides=overrides)
        create_topics(cfg)
        replay(cfg, data, None, events, False)
        if kind == "worker":
            publish_random_model(cfg, data)
            proc = spawn_cli(["worker", "--loglevel", "warning", *overrides], tmp / "log")
        else:
            proc = spawn(["-m", "lrustream.bench.stream", *overrides], tmp / "log")
        try:
            n, rate, _ = output_stats(cfg, events, timeout_s=events / 500 + 120)
            log(f"{kind:6s}: {n} of {events} events out, {rate:,.0f} events/s (drain of a pre-loaded topic)")
            results[f"{kind}_events_per_s"] = rate
            if kind == "worker":
                t0, since = time.monotonic(), int(time.time() * 1000)
                replay(cfg, data, latency_rate, latency_events, False)  # the data set's first events, once more
                _, _, steady = output_stats(cfg, events + latency_events, timeout_s=120, since_ms=since)
                results.update(p50_ms=percentile(steady, 0.5) * 1000, p99_ms=percentile(steady, 0.99) * 1000)
                log(f"worker: latency at {latency_rate:,.0f} events/s over {len(steady)} events "
                    f"({time.monotonic() - t0:.0f} s): p50 {results['p50_ms']:.1f} ms, p99 {results['p99_ms']:.1f} ms")
        finally:
            stop([proc])
    ratio = results["worker_events_per_s"] / results["bare_events_per_s"]
    log(f"worker / bare agent throughput: {ratio:.0%}")
    results["ratio"] = ratio
    return results


if __name__ == "__main__":
    bare_agent(load_config(overrides=sys.argv[1:]))
