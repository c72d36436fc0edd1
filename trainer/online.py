"""Online fine-tuning: training examples from the stream -> a bounded replay buffer -> periodic rounds of
parallel-scan fine-tuning -> a validation gate -> a published version the workers hot-swap.

Why a gate: a round trains on a few thousand recent windows; it can overfit or diverge. The candidate is
scored against the serving version on held-out next items (the last item of the most recent windows, never
trained on) and published only if finite and not worse than ``online.tolerance``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lrustream.config import Config, resolve_path
from models.base import SeqRecModel
from models.store import ModelStore
from models.vocab import Vocabulary
from trainer.evaluate import left_pad, metrics_from_ranks, ranks_of
from trainer.offline import make_optimizer, pick_device, sequence_loss, train_windows

log = logging.getLogger("lrustream.trainer")


class ReplayBuffer:
    """The latest window of each recently active user (bounded, oldest user evicted first) plus a uniform
    reservoir sample of evicted windows, so rounds see fresh behaviour without forgetting older users."""

    def __init__(self, recent: int, reservoir: int, seed: int = 0) -> None:
        self.recent: OrderedDict[str, list[str]] = OrderedDict()
        self.reservoir: list[list[str]] = []
        self.recent_cap, self.reservoir_cap = recent, reservoir
        self.evicted = 0
        self.rng = random.Random(seed)

    def add(self, user: str, items: list[str]) -> None:
        self.recent.pop(user, None)
        self.recent[user] = items
        while len(self.recent) > self.recent_cap:
            _, old = self.recent.popitem(last=False)
            self._keep(old)

    def _keep(self, window: list[str]) -> None:
        self.evicted += 1
        if len(self.reservoir) < self.reservoir_cap:
            self.reservoir.append(window)
        else:
            j = self.rng.randrange(self.evicted)
            if j < self.reservoir_cap:
                self.reservoir[j] = window

    def __len__(self) -> int:
        return len(self.recent) + len(self.reservoir)

    def split(self, holdout_fraction: float, min_holdout: int = 0) -> tuple[list[list[str]], list[list[str]]]:
        """(training windows, held-out windows): the most recent users' windows are held out (a fraction, but
        at least ``min_holdout`` while that leaves half for training); their last item is the validation
        target and is cut from the training copy."""
        recent = list(self.recent.values())
        n_hold = max(int(len(recent) * holdout_fraction), min(min_holdout, len(recent) // 2))
        held = [w for w in recent[len(recent) - n_hold:] if len(w) >= 2]
        train = recent[: len(recent) - n_hold] + [w[:-1] for w in held] + self.reservoir
        return [w for w in train if len(w) >= 2], held


@dataclass
class RoundResult:
    published: str | None
    reason: str
    candidate: dict[str, float] = field(default_factory=dict)
    serving: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    new_items: int = 0

    def line(self) -> str:
        c, s = self.candidate.get("NDCG@10", math.nan), self.serving.get("NDCG@10", math.nan)
        cr, sr = self.candidate.get("Recall@10", math.nan), self.serving.get("Recall@10", math.nan)
        what = f"published {self.published}" if self.published else f"kept serving ({self.reason})"
        return (f"round: {what}; holdout NDCG@10 {c:.4f} vs {s:.4f}, Recall@10 {cr:.4f} vs {sr:.4f}; "
                f"{self.new_items} new items; {self.seconds:.1f} s")


def holdout_metrics(model: SeqRecModel, vocab: Vocabulary, held: list[list[str]]) -> dict[str, float]:
    """Next-item metrics on held-out windows; a target the model's vocabulary lacks counts as a miss."""
    if not held:
        return {}
    oov = model.oov_index
    inputs = left_pad([np.array([vocab.get(x) or oov for x in w[:-1]]) for w in held], model.max_len)
    targets = torch.tensor([vocab.get(w[-1]) or 0 for w in held])
    model.eval()
    with torch.no_grad():
        scores = model.score(model.last_hidden(inputs)).float()
    ranks = ranks_of(scores, inputs, targets.clamp(min=1))
    ranks = torch.where(targets > 0, ranks, model.num_items + 1)
    return metrics_from_ranks(ranks)


def fine_tune(model: SeqRecModel, vocab: Vocabulary, windows: list[list[str]], cfg: Config,
              device: torch.device) -> float:
    """A few optimiser steps over the buffer with the parallel forward; returns the last loss."""
    encoded = [np.array([vocab.id_of(x) for x in w]) for w in windows]
    tokens, labels = train_windows(encoded, model.max_len)
    model.to(device).train()
    opt = make_optimizer(model, cfg.train, lr=cfg.online.lr)
    g = torch.Generator().manual_seed(cfg.train.seed)
    loss = torch.tensor(math.nan)
    for _ in range(cfg.online.steps_per_round):
        idx = torch.randint(len(tokens), (min(cfg.train.batch_size, len(tokens)),), generator=g)
        loss = sequence_loss(model, tokens[idx].to(device), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
    model.to("cpu").eval()
    return float(loss.detach())


def run_round(cfg: Config, buffer: ReplayBuffer, store: ModelStore,
              announce: Callable[[str], None] | None = None) -> RoundResult:
    t0 = time.monotonic()
    serving = store.load()
    train, held = buffer.split(cfg.online.holdout_fraction, cfg.online.min_holdout)
    if not train:
        return RoundResult(None, "buffer empty")
    if len(held) < cfg.online.min_holdout:
        return RoundResult(None, f"only {len(held)} held-out windows (< online.min_holdout={cfg.online.min_holdout})")
    vocab = Vocabulary(serving.vocab.items())
    for w in train:
        for x in w:
            vocab.add(x)
    candidate = store.load(serving.info.version).model
    new_items = len(vocab) - len(serving.vocab)
    candidate.grow_items(len(vocab))
    try:
        loss = fine_tune(candidate, vocab, train, cfg, pick_device(cfg.train.device))
    except (RuntimeError, FloatingPointError) as exc:  # divergence can overflow inside the optimiser
        log.warning("fine-tuning diverged: %s", exc)
        loss = math.nan
    cand_m = holdout_metrics(candidate, vocab, held)
    serv_m = holdout_metrics(serving.model, serving.vocab, held)
    result = RoundResult(None, "", cand_m, serv_m, new_items=new_items)
    tol = cfg.online.tolerance
    finite = math.isfinite(loss) and all(torch.isfinite(p).all() for p in candidate.parameters())
    if not finite:
        result.reason = "non-finite loss or weights"
    elif cand_m and cand_m["NDCG@10"] < serv_m["NDCG@10"] - tol:
        result.reason = f"holdout NDCG@10 {cand_m['NDCG@10']:.4f} < serving {serv_m['NDCG@10']:.4f} - {tol}"
    else:
        info = store.publish(candidate, vocab, metrics={f"holdout_{k}": v for k, v in cand_m.items()},
                             parent=serving.info.version, notes={"source": "online", "windows": len(train),
                                                                 "heldout": len(held), "loss": loss})
        result.published = info.version
        if announce:
            announce(info.version)
    result.seconds = time.monotonic() - t0
    return result


def resume_positions(consumer: Any, topic: str, timeout_s: float = 60.0) -> list[Any]:
    """Every partition of ``topic`` with the offset to resume at: the one committed under the consumer's
    group, or the beginning where none is.

    The trainer is one process that reads the whole topic, so it assigns partitions itself instead of
    joining a group: no rebalance to wait out at start-up or after a broker restart. It asks for the committed
    offsets itself, retrying, and assigns explicit offsets, because an ``assign()`` left to look them up can
    hang for ever when the lookup meets a coordinator that is not ready (librdkafka #5586, seen here as a
    trainer that consumed nothing after a broker restart).
    """
    from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

    from stream.kafka import topic_partitions

    deadline = time.monotonic() + timeout_s
    while True:
        problem = None
        try:
            partitions = topic_partitions(consumer, topic)
            committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
            problem = next((tp.error for tp in committed if tp.error is not None), None)
        except KafkaException as exc:
            problem = exc
        if problem is None:
            return [TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                    for tp in committed]
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not read the committed offsets of {topic!r}: {problem}")
        log.info("committed offsets of %s not readable yet (%s); retrying", topic, problem)
        time.sleep(0.5)


class TrainerLoop:
    """``lrustream trainer``: consume training examples, run a round every N events / T seconds / on request."""

    def __init__(self, cfg: Config, log_line: Callable[[str], None] = print) -> None:
        from confluent_kafka import Consumer

        from stream.kafka import librdkafka_config
        from stream.updates import UpdateFollower

        self.cfg = cfg
        self.log = log_line
        self.store = ModelStore(resolve_path(cfg.model_store.dir))
        o = cfg.online
        self.buffer = ReplayBuffer(o.recent_buffer, o.reservoir_buffer, cfg.train.seed)
        self.examples = Consumer(librdkafka_config(cfg, **{"group.id": o.group_id, "auto.offset.reset": "earliest",
                                                           "enable.auto.commit": True}))
        self.examples.assign(resume_positions(self.examples, cfg.topics.training_examples))
        self.requests = UpdateFollower(cfg)  # refresh requests from operators
        self.events_since = 0
        self.last_round = time.monotonic()
        self.requested = False

    def poll(self, timeout_s: float = 0.5) -> int:
        n = 0
        for msg in self.examples.consume(num_messages=2000, timeout=timeout_s):
            if msg.error():
                continue
            try:
                ex = json.loads(msg.value())
                self.buffer.add(str(ex["user_id"]), [str(x) for x in ex["items"]])
                self.events_since += int(ex.get("new", 1))
                n += 1
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring malformed training example at %s[%d]@%d", msg.topic(), msg.partition(),
                            msg.offset())
        while (message := self.requests.next_message(0)) is not None:
            if message.get("request") == "refresh":
                self.requested = True
        return n

    def due(self) -> bool:
        o = self.cfg.online
        if len(self.buffer) == 0:
            return False
        return (self.requested or self.events_since >= o.every_events
                or time.monotonic() - self.last_round >= o.every_seconds)

    def round(self) -> RoundResult:
        from stream.updates import announce

        result = run_round(self.cfg, self.buffer, self.store,
                           announce=lambda v: announce(self.cfg, v, "fine-tune"))
        self.events_since, self.requested, self.last_round = 0, False, time.monotonic()
        self.log(result.line())
        self._record(result)
        return result

    def _record(self, result: RoundResult) -> None:
        """Every round's outcome, published or refused and why, in the model store's rounds.jsonl."""
        entry = {"at": time.time(), "published": result.published, "reason": result.reason,
                 "candidate": result.candidate, "serving": result.serving, "new_items": result.new_items,
                 "seconds": round(result.seconds, 2), "buffer": len(self.buffer)}
        with (self.store.root / "rounds.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def run(self, max_rounds: int | None = None) -> None:
        rounds = 0
        while max_rounds is None or rounds < max_rounds:
            self.poll()
            if self.due():
                self.round()
                rounds += 1

    def close(self) -> None:
        self.examples.close()
        self.requests.close()

