"""Prequential ("test, then train") evaluation through the real pipeline: ``lrustream evaluate-stream``.

The data set's events are split in global time order: the first half trains the starting model offline,
the second half is replayed through Kafka into a real worker. Each event is scored against the
recommendation that was served to that user BEFORE the event (the one emitted for the user's previous
event): HR@10 and NDCG@10 over time. It runs twice from the same starting model: frozen (worker only) and
online (worker plus ``lrustream trainer`` fine-tuning and hot-swapping as the stream flows).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lrustream.children import spawn_cli, stop, wait_healthy
from lrustream.config import Config, load_config


def split_events(data: str, limit: int | None) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
    from trainer.data import load_sequences

    events = list(load_sequences(data).events())
    if limit:
        events = events[:limit]
    cut = len(events) // 2
    return events[:cut], events[cut:]


def train_start_model(cfg: Config, warm: list[tuple[str, str, int]], minutes: float, log: Callable[[str], None]):
    """The starting model: trained offline on the first half only (nothing of the replayed half leaks in)."""
    import torch

    from models import build_model
    from models.vocab import Vocabulary
    from trainer.offline import leave_one_out, model_hparams, pick_device, train

    vocab = Vocabulary()
    seqs: dict[str, list[int]] = {}
    for user, item, _ in warm:
        seqs.setdefault(user, []).append(vocab.add(item))
    encoded = [np.array(s) for s in seqs.values() if len(s) >= 3]
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, len(vocab), **model_hparams(cfg, cfg.model.name))
    hist = train(model, leave_one_out(encoded, cfg.model.max_len), cfg.train, pick_device(cfg.train.device),
                 max_minutes=minutes, progress=sys.stderr.isatty())
    log(f"starting model: {cfg.model.name} on {len(warm)} events, {len(vocab)} items, {hist.steps_done} steps "
        f"({hist.seconds:.0f} s); offline test NDCG@10 {hist.test.get('NDCG@10', math.nan):.4f}")
    return model.cpu().eval(), vocab


def _overrides(base: list[str], tag: str, root: Path, online_every: int) -> list[str]:
    return [*base, f"topics.interactions=preq-{tag}-in", f"topics.recommendations=preq-{tag}-out",
            f"topics.dlq=preq-{tag}-dlq", f"topics.state_changelog=preq-{tag}-changelog",
            f"topics.training_examples=preq-{tag}-train", f"topics.model_updates=preq-{tag}-updates",
            f"stream.app_id=preq-{tag}", f"online.group_id=preq-{tag}-trainer", f"state.dir={root / 'state'}",
            f"model_store.dir={root / 'models'}", "stream.unknown_items=oov", f"online.every_events={online_every}",
            "online.every_seconds=1000000", f"http.port={_free_port()}"]


def _free_port() -> int:
    from lrustream.broker import free_port

    return free_port()


def _produce(cfg: Config, events: list[tuple[str, str, int]], rate: float) -> dict[tuple[int, int], tuple[str, str]]:
    """Send the replayed half at ``rate``; return (partition, offset) -> (user, item) from delivery reports."""
    from confluent_kafka import Producer

    from stream.events import encode_event
    from stream.kafka import producer_config
    from stream.tools import Pacer

    sent: dict[tuple[int, int], tuple[str, str]] = {}
    producer = Producer(producer_config(cfg))
    pacer = Pacer(rate)

    def done(err, msg, what) -> None:  # type: ignore[no-untyped-def]
        if err is None:
            sent[(msg.partition(), msg.offset())] = what

    for user, item, ts in events:
        key, value = encode_event(user, item, ts)
        wait = pacer.wait_s()
        if wait > 0:
            producer.poll(wait)
        while True:
            try:
                producer.produce(cfg.topics.interactions, value, key,
                                 on_delivery=lambda e, m, w=(user, item): done(e, m, w))
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(60)
    return sent


def _collect(cfg: Config, expect: int, timeout_s: float) -> list[dict]:
    from confluent_kafka import Consumer

    from stream.kafka import librdkafka_config

    consumer = Consumer(librdkafka_config(cfg, **{"group.id": f"preq-{uuid.uuid4().hex[:6]}",
                                                  "auto.offset.reset": "earliest", "enable.auto.commit": False}))
    consumer.subscribe([cfg.topics.recommendations])
    out: list[dict] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expect and time.monotonic() < deadline:
            out += [json.loads(m.value()) for m in consumer.consume(num_messages=5000, timeout=0.5) if not m.error()]
    finally:
        consumer.close()
    return out


def score(recs: list[dict], sent: dict[tuple[int, int], tuple[str, str]], k: int = 10) -> list[tuple[float, float]]:
    """(hit, ndcg) per scored event, in stream order: each event against the user's previous recommendation."""
    first: dict[tuple[int, int], dict] = {}
    for r in recs:
        first.setdefault((r["source"]["partition"], r["source"]["offset"]), r)  # de-duplicate repeats
    previous: dict[str, list[str]] = {}
    out: list[tuple[float, float]] = []
    for source in sorted(sent, key=lambda s: (s[1], s[0])):
        user, item = sent[source]
        if user in previous:
            items = previous[user][:k]
            rank = items.index(item) if item in items else -1
            out.append((1.0 if rank >= 0 else 0.0, 1.0 / math.log2(rank + 2) if rank >= 0 else 0.0))
        rec = first.get(source)
        if rec is not None:
            previous[user] = rec["items"]
    return out


def run_mode(mode: str, base: list[str], root: Path, model, vocab, events, rate: float, online_every: int,
             log: Callable[[str], None]) -> list[tuple[float, float]]:
    from models.store import ModelStore
    from stream.topics import create_topics

    tag = f"{mode}-{uuid.uuid4().hex[:6]}"
    mode_root = root / tag
    mode_root.mkdir(parents=True, exist_ok=True)
    overrides = _overrides(base, tag, mode_root.resolve(), online_every)
    cfg = load_config(overrides=overrides)
    create_topics(cfg)
    ModelStore(cfg.model_store.dir).publish(model, vocab, notes={"source": "prequential start"})
    procs = [spawn_cli(["worker", "--loglevel", "warning", *overrides], mode_root / "worker.log")]
    if mode == "online":
        procs.append(spawn_cli(["trainer", *overrides], mode_root / "trainer.log"))
    try:
        wait_healthy(cfg, procs[0], mode_root / "worker.log")
        t0 = time.monotonic()
        sent = _produce(cfg, events, rate)
        recs = _collect(cfg, len(sent), timeout_s=len(sent) / 200 + 120)
        log(f"{mode}: {len(sent)} events replayed, {len(recs)} recommendations in {time.monotonic() - t0:.0f} s; "
            f"versions served: {sorted({r['model_version'] for r in recs})}")
    finally:
        stop(procs)
    return score(recs, sent)


def write_outputs(results: dict[str, list[tuple[float, float]]], out: Path, bucket: int) -> tuple[Path, Path]:
    """CSV of HR@10/NDCG@10 per bucket of scored events (windowed and cumulative) and a PNG of both curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    n = min(len(v) for v in results.values())
    rows = []
    for start in range(0, n, bucket):
        row: dict[str, float] = {"events": min(start + bucket, n)}
        for mode, vals in results.items():
            arr = np.array(vals[:n])
            win, cum = arr[start: start + bucket], arr[: start + bucket]
            row[f"hr10_{mode}"], row[f"ndcg10_{mode}"] = win[:, 0].mean(), win[:, 1].mean()
            row[f"hr10_{mode}_cum"], row[f"ndcg10_{mode}_cum"] = cum[:, 0].mean(), cum[:, 1].mean()
        rows.append(row)
    csv_path, png_path = out / "prequential.csv", out / "prequential.png"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("hr10", "ndcg10"), strict=True):
        for mode in results:
            ax.plot([r["events"] for r in rows], [r[f"{metric}_{mode}"] for r in rows], label=mode)
        ax.set_xlabel("replayed events (scored)")
        ax.set_ylabel(metric.replace("10", "@10").upper())
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("prequential evaluation: recommendation served before each event")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return csv_path, png_path


def run_prequential(base: list[str], data: str, out: Path, limit: int | None, rate: float, train_minutes: float,
                    online_every: int, bucket: int, log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    cfg = load_config(overrides=base)
    warm, stream = split_events(data, limit)
    model, vocab = train_start_model(cfg, warm, train_minutes, log)
    results = {mode: run_mode(mode, base, out / "runs", model, vocab, stream, rate, online_every, log)
               for mode in ("frozen", "online")}
    csv_path, png_path = write_outputs(results, out, bucket)
    summary = {mode: {"HR@10": float(np.mean([h for h, _ in v])), "NDCG@10": float(np.mean([g for _, g in v])),
                      "scored": len(v)} for mode, v in results.items()}
    for mode, m in summary.items():
        log(f"{mode:6s}: HR@10 {m['HR@10']:.4f}  NDCG@10 {m['NDCG@10']:.4f}  over {m['scored']} scored events")
    log(f"wrote {csv_path} and {png_path}")
    return summary
