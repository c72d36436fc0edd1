"""Online fine-tuning: training examples from the stream -> an event buffer -> rounds of parallel-scan
fine-tuning of a learner that carries its optimiser across rounds -> a gate judged on what came next ->
a version published on the model-versions topic (stream/versions.py), which every worker hot-swaps.

The contract of one round (``OnlineLearner.round``):

1. **Data.** Every event the worker served is a next-item target. The buffer keeps each recently active user's
   latest item window and a log of events in arrival order. Events after ``buffer.trained`` are *new*: the
   serving model has not trained on them (trainer/buffer.py).
2. **Holdout = what comes next.** The most recent new events are held out: as many as the gate needs to tell
   (trainer/gate.py ``needed_heldout``, at the lowest serving hit rate of the last few gates: a few hundred
   recent events are a few users' bursts, and their hit rate swings from one round to the next: sized from the
   last one alone, every few rounds would hold too few hits to tell; before any gate, ``holdout_fraction`` of the new
   events), at least ``min_holdout``, at most ``max_holdout``; a round that would
   leave fewer than ``min_holdout`` events to train on waits for more (code ``holdout``). Training
   sees each user's window cut before that user's first held-out event, so no held-out target, nor anything
   after it, is trained on. Held-out events are trained on by the next round.
3. **Training.** Whole user windows (the last ``train_len`` items) through the parallel scan, softmax
   cross-entropy at every position: over the whole vocabulary, or sampled once it holds more than
   ``train.sampled_softmax_above`` items (trainer/loss.py), so a step's cost does not grow with the vocabulary.
   A batch mixes users with new events with a replay of other users (recent ones and a reservoir of evicted
   ones), so the model follows the stream without forgetting. The time
   training takes is at least ``max_train_seconds`` and at least what the round spends outside training
   (loading and growing the vocabulary, measured before training; the gate on its held-out events and publishing,
   predicted from the last few rounds' rates), so that training is about half of a round or more however large
   the catalogue (less when the gate or publishing is slower than predicted: a first round has nothing to
   predict them from); it takes ``min_steps`` to ``max_steps`` steps within that time. The learning rate follows the
   gate: ``online.lr`` at first, then half after a candidate that did not beat the serving model on its
   held-out events, 1.25 times higher (up to ``online.lr``) after one that did (:meth:`OnlineLearner.next_lr`).
   The learner starts from the serving weights (warm start), fine-tunes with ``online.dropout`` and keeps its
   AdamW moments from round to round, resized when the vocabulary grows; it starts afresh only when the
   serving version is not the one it last published (a rollback, a version from elsewhere). A fresh optimiser
   ramps its learning rate up over ``warmup_steps`` (Adam's first updates are full-size in every weight, which
   made first rounds worse than the serving model). A step's windows go through the model in groups of similar
   length (``length_groups``), each padded only to its longest: the same gradient as one padded batch.
4. **Gate.** Candidate and serving model rank every held-out event (same inputs); the per-event NDCG@10
   differences get a paired bootstrap confidence interval (trainer/gate.py). The round publishes unless the
   weights are not finite, the candidate is worse with confidence, or, unless it is not worse by more than
   ``tolerance`` of serving's own figure with confidence, the held-out events hold too few of the serving
   model's hits to tell (``inconclusive``) or its mean is below serving's by more than that margin. A
   candidate found worse is discarded: the learner goes back to the serving weights and moments, and its new
   events stay new for the next round. An ``inconclusive`` candidate is kept and trained further by the next
   round, whose holdout is sized anew and taken only from events after those it trained on, so evidence and
   training both accumulate across rounds until the gate can decide. Every refusal says why, with numbers.

Each round is appended to ``<model store>/rounds.jsonl`` (the record :class:`RoundResult.record` writes), with
the seconds of each of its parts: loading the serving version, growing the vocabulary, training, the gate and
publishing.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrustream.kernel.config import Config, resolve_path
from lrustream.kernel.http import check_http_exposure
from models.base import SeqRecModel
from models.store import POPULAR_NOTE, LoadedModel, ModelStore, ModelStoreError, popular_note
from models.vocab import Vocabulary
from stream.examples import BadExample, decode_example
from stream.versions import VersionLog
from trainer.buffer import EventBuffer
from trainer.evaluate import left_pad
from trainer.gate import Verdict, event_metrics, judge, needed_heldout
from trainer.live import Judgement, LiveWatch
from trainer.loss import Sampling, sequence_loss
from trainer.optim import clip_gradients, make_optimizer, optimizer_step, pick_device, warm_up

log = logging.getLogger("lrustream.trainer")
ROUNDS_KEPT = 20  # round records the operator page shows (trainer/page.py)
# The learning rate follows the gate (bold driver): up by LR_GROW after a candidate that beat the serving model on
# its held-out events, down by LR_SHRINK otherwise, within [online.lr / LR_RANGE, online.lr]. A coin-flip gate (a
# model fine-tuning no longer improves) drives it down: 0.5 * log(1.25 * 0.5) < 0 per round. It never rises above
# online.lr: held-out events are the ones right after the training data, and on a stream whose days cluster
# around the same items they flatter a candidate that chased the latest ones, so a run of passed gates is no
# evidence that bigger steps would serve better.
LR_GROW, LR_SHRINK = 1.25, 0.5
LR_RANGE = 100.0
# the last rounds whose gates (hit rate, seconds per event) and publishes size the next: holdout_size, train_seconds
OVERHEAD_ROUNDS = 5


# ----- one round's outcome -------------------------------------------------------------------------------------
@dataclass
class RoundResult:
    published: str | None = None
    refused: str | None = None  # a short code: no-data | holdout | non-finite | gate | inconclusive
    reason: str = ""
    candidate: dict[str, float] = field(default_factory=dict)
    serving: dict[str, float] = field(default_factory=dict)
    gate: dict[str, float] = field(default_factory=dict)
    new_events: int = 0
    trained_events: int = 0
    steps: int = 0
    loss: float = math.nan
    new_items: int = 0
    unknown_items: int = 0  # distinct items of the round's windows left out of a full vocabulary
    vocabulary: int = 0  # items the learner's vocabulary holds after the round
    seconds: float = 0.0
    train_seconds: float = 0.0
    lr: float = 0.0  # the learning rate the round trained at
    parts: dict[str, float] = field(default_factory=dict)  # seconds per part: load, grow, train, gate, publish

    def refuse(self, code: str, reason: str) -> RoundResult:
        self.refused, self.reason = code, reason
        return self

    def line(self) -> str:
        what = f"published {self.published}" if self.published else f"kept serving ({self.refused}: {self.reason})"
        c, s = self.candidate, self.serving
        gate = (f"; held-out HR@10 {c['HR@10']:.4f} vs {s['HR@10']:.4f}, NDCG@10 {c['NDCG@10']:.4f} vs "
                f"{s['NDCG@10']:.4f} on {self.gate.get('heldout', 0):.0f} events" if c and s else "")
        full = f" ({self.unknown_items} left unknown: the vocabulary is full)" if self.unknown_items else ""
        return (f"round: {what}{gate}; {self.new_events} new events, {self.steps} steps, {self.new_items} new "
                f"items{full}; {self.seconds:.1f} s")

    def judged(self, verdict: Verdict) -> bool:
        """Take the gate's numbers; True when the candidate may be published."""
        self.candidate, self.serving, self.gate = verdict.candidate, verdict.serving, verdict.numbers
        if verdict.refusal:
            self.refuse(verdict.code, verdict.refusal)
        return self.refused is None

    def record(self, buffer: EventBuffer) -> dict[str, Any]:
        return {"at": time.time(), "published": self.published, "refused": self.refused, "reason": self.reason,
                "candidate": self.candidate, "serving": self.serving, "gate": self.gate,
                "new_events": self.new_events, "trained_events": self.trained_events, "steps": self.steps,
                "loss": self.loss, "new_items": self.new_items, "unknown_items": self.unknown_items,
                "vocabulary": self.vocabulary, "seconds": round(self.seconds, 3),
                "train_seconds": round(self.train_seconds, 3), "lr": self.lr,
                "parts": {k: round(v, 3) for k, v in self.parts.items()}, "buffer_users": len(buffer.users),
                "buffer_events": buffer.seen}


# ----- the learner ---------------------------------------------------------------------------------------------
Batch = tuple[torch.Tensor, torch.Tensor]  # (tokens, next-item labels), left-padded, 0 = padding / no label


def length_groups(rows: list[np.ndarray], groups: int, oov: int = 0) -> list[Batch]:
    """A batch of windows (item ids, oldest first; each gives tokens ``w[:-1]`` and labels ``w[1:]``) as at most
    ``groups`` groups of similar length, each left-padded only to its own longest window. Every model here is
    causal and reads no padding, so a row's outputs do not depend on how far it is padded. An id of -1 (an item
    the full vocabulary has no room for) reads as the ``oov`` token and is no target (label 0)."""
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
    size = max(1, math.ceil(len(rows) / max(1, groups)))
    out = []
    for s in range(0, len(order), size):
        part = [rows[r] for r in order[s: s + size]]
        width = max(1, max(len(w) for w in part) - 1)
        tokens = [np.where(w[:-1] < 0, oov, w[:-1]) for w in part]
        labels = [np.maximum(w[1:], 0) for w in part]
        out.append((left_pad(tokens, width), left_pad(labels, width)))
    return out


def covering_draws(n: int, k: int, rng: torch.Generator) -> Iterator[list[int]]:
    """Endless draws of ``k`` indices into ``range(n)`` (n > 0): every index once, in a shuffled order, before
    any comes again. Draws with replacement leave users out: 160 draws from 200 users miss about 45% of them.
    On the 2-core ML-1M replay (one starting model, replay_share 0.5) online/frozen HR@10 went from 1.150 (mean
    of two runs with replacement) to 1.164."""
    order: list[int] = []
    while True:
        while len(order) < k:
            order += torch.randperm(n, generator=rng).tolist()
        yield order[:k]
        del order[:k]


def backward_groups(model: SeqRecModel, groups: list[Batch], device: torch.device,
                    sampling: Sampling | None = None) -> float:
    """Back-propagate one batch given as length groups: each group's loss weighted by its share of the batch's
    labelled positions, so the gradients add up to those of the mean over every labelled position. Returns that
    mean loss. With ``sampling`` applying to the catalogue, each group's loss is the sampled softmax over its own
    targets and draws (trainer/loss.py)."""
    counts = [int((labels > 0).sum()) for _, labels in groups]
    total, loss = sum(counts), 0.0
    for (tokens, labels), n in zip(groups, counts, strict=True):
        if n == 0:  # nothing to learn from (every target unknown): no loss, no gradient
            continue
        part = sequence_loss(model, tokens.to(device), labels.to(device), sampling) * (n / total)
        part.backward()
        loss += float(part.detach())
    return loss


def _in_order(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in the order an optimiser's state dict numbers them (group after group)."""
    return [p for group in opt.param_groups for p in group["params"]]


def grow_moments(opt_state: dict[str, Any], params: list[torch.Tensor], old_rows: dict[int, int]
                 ) -> dict[str, Any]:
    """An optimiser state dict for ``params`` (state-dict order) after ``grow_items``: the moments of a grown
    table (index -> its old row count) keep their rows and get zeros for the new items' rows, inserted before
    the OOV row as the table's were."""
    for idx, st in opt_state["state"].items():
        n_old = old_rows.get(idx)
        if n_old is None:
            continue
        rows = params[idx].shape[0]
        for key in ("exp_avg", "exp_avg_sq"):
            t = st[key]
            zeros = t.new_zeros(rows - t.shape[0], *t.shape[1:])
            st[key] = torch.cat([t[:n_old - 1], zeros, t[n_old - 1:]])
    return opt_state


class OnlineLearner:
    """The trainer's copy of the serving model with its AdamW moments, carried from round to round."""

    def __init__(self, cfg: Config, store: ModelStore, publisher: VersionLog | None = None) -> None:
        """``publisher``: where versions go (the model-versions topic, which ``store`` caches); None: ``store``
        alone."""
        self.cfg, self.o, self.store = cfg, cfg.online, store
        self.publisher = publisher
        self.device = pick_device(cfg.train.device)
        self.version: str | None = None  # the serving version this learner stands for
        self.model: SeqRecModel | None = None
        self.vocab = Vocabulary()
        self.opt: torch.optim.Optimizer | None = None
        self.rng = torch.Generator().manual_seed(cfg.train.seed)
        self.sampling = Sampling.of(cfg.train)  # the sampled softmax above train.sampled_softmax_above items
        self.warm_starts = 0
        self.lr = cfg.online.lr  # the next round's, adapted by the gate (next_lr)
        self.context = cfg.online.train_len or cfg.model.max_len
        # the serving model's held-out hit rate at the last few gates (holdout_size)
        self.hit_rates: deque[float] = deque(maxlen=OVERHEAD_ROUNDS)
        self.trained_before: dict[str, int] = {}  # per version published: buffer.trained before its round
        # a candidate the gate found inconclusive, trained on: the serving weights and moments it started from,
        # and the event number its training data ended at (later rounds hold out only events from there on)
        self.base: tuple[dict[str, torch.Tensor], dict[str, Any], int] | None = None
        self.continued_to = 0
        # what the last rounds' gates took per held-out event and their publishing took (train_seconds)
        self.gate_rates: deque[float] = deque(maxlen=OVERHEAD_ROUNDS)
        self.publish_seconds: deque[float] = deque(maxlen=OVERHEAD_ROUNDS)

    def _sync(self, serving: LoadedModel) -> None:
        """Warm start from the serving weights unless this learner already stands for the serving version."""
        if self.version == serving.info.version and self.model is not None:
            return
        self.model = self._tuned(copy.deepcopy(serving.model)).to(self.device)
        self.vocab = Vocabulary(serving.vocab.items())
        self.opt = make_optimizer(self.model, self.cfg.train, lr=self.o.lr)
        self.version = serving.info.version
        self.warm_starts += 1
        self.base, self.continued_to = None, 0

    def _tuned(self, model: SeqRecModel) -> SeqRecModel:
        """The learner's copy with ``online.dropout`` (a training-time setting: published weights are alike)."""
        if self.o.dropout >= 0:
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = self.o.dropout
        return model

    def _grow(self, windows: Iterable[list[str]]) -> tuple[int, int]:
        """Append the windows' new items to the vocabulary, the model and its AdamW moments while there is room
        (``online.max_items``). Returns (items added, distinct items left unknown)."""
        assert self.model is not None and self.opt is not None
        before = len(self.vocab)
        unknown: set[str] = set()
        for w in windows:
            for x in w:
                if x in self.vocab:
                    continue
                if len(self.vocab) < self.o.max_items:
                    self.vocab.add(x)
                else:
                    unknown.add(x)
        if len(self.vocab) > before:
            rows = [p.shape[0] if p.dim() else 0 for p in _in_order(self.opt)]
            state = self.opt.state_dict()
            self.model.grow_items(len(self.vocab))
            self.opt = make_optimizer(self.model, self.cfg.train, lr=self.o.lr)
            params = _in_order(self.opt)
            grown = {i: n for i, (n, p) in enumerate(zip(rows, params, strict=True)) if p.dim() and p.shape[0] != n}
            self.opt.load_state_dict(grow_moments(state, params, grown))
        if unknown:
            log.warning("the vocabulary is full (online.max_items=%d): %d new items stay unknown to the model",
                        self.o.max_items, len(unknown))
        return len(self.vocab) - before, len(unknown)

    def _batches(self, with_new: list[list[str]], others: list[list[str]], steps: int) -> Iterable[list[Batch]]:
        """``steps`` batches of whole windows (last ``train_len`` + 1 items -> tokens, next-item labels): a share
        ``replay_share`` of rows drawn uniformly from users without new events, the rest from users with new
        events, each of them once (in a shuffled order) before any is drawn again (:func:`covering_draws`), so a
        round trains every new event it has time for. Only drawn windows are encoded; each batch comes as its
        ``length_groups`` (:func:`length_groups`)."""
        L, B = self.context, self.cfg.train.batch_size if self.o.batch_size <= 0 else self.o.batch_size
        replay = (min(B - 1, round(B * self.o.replay_share)) if others else 0) if with_new else B
        fresh = covering_draws(len(with_new), B - replay, self.rng)
        for _ in range(steps):
            picks = [with_new[i] for i in next(fresh)] if with_new else []
            if replay:
                picks += [others[i] for i in torch.randint(len(others), (replay,), generator=self.rng).tolist()]
            rows = [np.array([self.vocab.get(x, -1) for x in w[-(L + 1):]], dtype=np.int64) for w in picks]
            yield length_groups(rows, self.o.length_groups, self.model.oov_index)

    def _train(self, batches: Iterable[list[Batch]], seconds: float) -> tuple[int, float]:
        """Optimiser steps until the batches or ``seconds`` (:meth:`train_seconds`) run out. A step's loss is the
        mean over every labelled position of its batch, whatever the grouping."""
        assert self.model is not None and self.opt is not None
        self.model.train()
        steps, loss = 0, math.nan
        deadline = time.monotonic() + seconds
        for groups in batches:
            if steps and time.monotonic() > deadline:
                break
            warm_up(self.opt, self.lr, self.o.warmup_steps)
            self.opt.zero_grad(set_to_none=True)
            loss = backward_groups(self.model, groups, self.device, self.sampling)
            clip_gradients(self.model, self.cfg.train.grad_clip)
            optimizer_step(self.opt)  # not clipped_step: a round that diverges is refused whole ("non-finite")
            steps += 1
        self.model.eval()
        return steps, loss

    def next_lr(self, diff: float) -> float:
        """The learning rate after a round whose candidate's mean held-out NDCG@10 was ``diff`` above the serving
        model's (NaN: weights not finite). A fine-tuning step that does not help is moving a model the stream
        does not ask to move: smaller steps stay nearer it."""
        moved = self.lr * (LR_GROW if diff > 0 else LR_SHRINK)
        return min(self.o.lr, max(self.o.lr / LR_RANGE, moved))

    def train_seconds(self, spent: float, held: int) -> float:
        """A round's training time: ``max_train_seconds``, or the time the round spends outside training when that
        is longer, so that training is about half of every round or more however large the catalogue. That time is
        ``spent`` (loading and growing, already measured) plus what the gate will take on ``held`` events at the
        slowest rate per event of the last few gates plus the slowest of the last few publishes."""
        gate = held * max(self.gate_rates, default=0.0)
        return max(self.o.max_train_seconds, spent + gate + max(self.publish_seconds, default=0.0))

    def holdout_size(self, new_events: int) -> int:
        """Held-out events a round with ``new_events`` wants: enough to hold :func:`~trainer.gate.needed_hits` at
        the lowest serving hit rate of the last few gates (``max_holdout`` after a gate with no hit), before any
        gate ``holdout_fraction`` of them; within [min_holdout, max_holdout]."""
        o = self.o
        if not self.hit_rates:
            wanted = int(new_events * o.holdout_fraction)
        else:
            wanted = needed_heldout(min(self.hit_rates), o) or o.max_holdout
        return min(o.max_holdout, max(o.min_holdout, wanted))

    def round(self, buffer: EventBuffer) -> RoundResult:
        t0 = time.monotonic()
        o = self.o
        result = RoundResult(new_events=buffer.new_events)
        if buffer.new_events == 0:
            return self._done(result.refuse("no-data", "no new events since the last published round"), t0)
        n_hold = self.holdout_size(buffer.new_events)
        serving = self.store.load()
        self._sync(serving)
        held, until = buffer.holdout(n_hold, after=self.continued_to)  # never what the candidate trained on
        trainable = until - buffer.trained
        if len(held) < o.min_holdout or trainable < o.min_holdout:  # wait for more events
            return self._done(result.refuse(
                "holdout", f"{buffer.new_events} new events: {len(held)} held out (the gate wants {n_hold}) and "
                           f"{trainable} to train on, each needs online.min_holdout={o.min_holdout}"), t0)
        assert self.model is not None and self.opt is not None
        base = self.base or (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.opt.state_dict()),
                             len(self.vocab))
        t_load = time.monotonic()
        result.parts["load"] = t_load - t0
        with_new, others = buffer.training_windows(until)
        result.new_items, result.unknown_items = self._grow([*with_new, *[h.prefix for h in held]])
        result.vocabulary = len(self.vocab)
        result.trained_events = trainable
        t1 = time.monotonic()
        result.parts["grow"] = t1 - t_load
        raised = ""
        result.lr = self.lr
        try:
            result.steps, result.loss = self._train(self._batches(with_new, others, self.o.max_steps),
                                                    self.train_seconds(t1 - t0, len(held)))
        except (RuntimeError, FloatingPointError) as exc:  # divergence can overflow inside the optimiser
            log.warning("fine-tuning diverged: %s", exc)
            raised = f" (fine-tuning raised {type(exc).__name__}: {exc})"
        result.train_seconds = result.parts["train"] = time.monotonic() - t1
        self.model.to("cpu")
        if not (math.isfinite(result.loss) and all(torch.isfinite(p).all() for p in self.model.parameters())):
            result.refuse("non-finite",
                          f"loss {result.loss} or weights not finite after {result.steps} steps{raised}")
            self.lr = self.next_lr(math.nan)
        else:
            t_gate = time.monotonic()
            cand = event_metrics(self.model, self.vocab, held, self.context)
            serv = event_metrics(serving.model, serving.vocab, held, self.context)
            verdict = judge(cand, serv, o)
            self.hit_rates.append(verdict.serving["HR@10"])
            self.lr = self.next_lr(verdict.numbers["diff"])
            t_publish = time.monotonic()
            result.parts["gate"] = t_publish - t_gate
            self.gate_rates.append(result.parts["gate"] / len(held))
            if result.judged(verdict):
                info = (self.publisher or self.store).publish(self.model, self.vocab, parent=serving.info.version,
                                          metrics={f"holdout_{k}": v for k, v in result.candidate.items()},
                                          notes={"source": "online", "trained_events": trainable,
                                                 "heldout": len(held), "steps": result.steps, "loss": result.loss,
                                                 "lr": result.lr,
                                                 POPULAR_NOTE: popular_note(
                                                     item for w in (*with_new, *others) for item in w)})
                self.version, result.published = info.version, info.version
                self.trained_before[info.version] = buffer.trained
                while len(self.trained_before) > 64:  # only a recent version is ever rolled back
                    del self.trained_before[next(iter(self.trained_before))]
                buffer.trained = until
                (self.publisher or self.store).gc(self.cfg.model_store.keep_versions)
                result.parts["publish"] = time.monotonic() - t_publish
                self.publish_seconds.append(result.parts["publish"])
        if result.refused == "inconclusive":  # too few events to tell: the next round goes on training it
            self.base, self.continued_to = base, until
        else:
            if result.published is None:  # discard the candidate: back to the serving weights and moments
                self._restore(*base)
            self.base, self.continued_to = None, 0
        self.model.to(self.device)
        return self._done(result, t0)

    def _restore(self, weights: dict[str, torch.Tensor], opt_state: dict[str, Any], n_items: int) -> None:
        assert self.model is not None
        if len(self.vocab) != n_items:
            self.vocab = Vocabulary(self.vocab.items()[:n_items])
            self.model = self._tuned(self.store.load(self.version).model)
        self.model.load_state_dict(weights)
        self.opt = make_optimizer(self.model, self.cfg.train, lr=self.o.lr)
        self.opt.load_state_dict(opt_state)

    @staticmethod
    def _done(result: RoundResult, t0: float) -> RoundResult:
        result.seconds = time.monotonic() - t0
        return result


# ----- the service -------------------------------------------------------------------------------------------
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

    from lrustream.kernel.kafka import topic_partitions

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


def recent_rounds(path: Path, keep: int = ROUNDS_KEPT, tail_bytes: int = 1 << 20) -> deque[dict[str, Any]]:
    """The last ``keep`` round records of ``rounds.jsonl`` (read from its last ``tail_bytes`` only, so a long
    history costs nothing at start-up); a missing file or a torn line gives fewer."""
    out: deque[dict[str, Any]] = deque(maxlen=keep)
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - tail_bytes))
            lines = f.read().splitlines()
    except OSError:
        return out
    # newest first, so a torn line (a write in progress, the cut) costs no record
    for record in json_records(reversed(lines)):
        if len(out) == keep:
            break
        out.appendleft(record)
    return out


def json_records(lines: Iterable[bytes | str]) -> Iterator[dict[str, Any]]:
    """The JSON objects among ``lines`` (round records, one a line), lazily; a line that is not one (cut short by
    a stop or a write in progress) is skipped."""
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


class TrainerLoop:
    """``lrustream trainer``: consume training examples, run a round every N events / T seconds / on request;
    ``GET /health``, ``GET /metrics`` and the operator page ``GET /`` on ``http.host:online.http_port``
    (trainer/service.py, trainer/page.py)."""

    LAG_EVERY_S = 5.0

    def __init__(self, cfg: Config, log_line: Callable[[str], None] = print, serve_http: bool = True) -> None:
        from confluent_kafka import Consumer

        from lrustream.kernel.kafka import librdkafka_config
        from stream.updates import UpdateFollower
        from trainer.service import TrainerHealth, TrainerHttp, TrainerMetrics

        self.cfg = cfg
        self.log = log_line
        self.store = ModelStore(resolve_path(cfg.model_store.dir))
        o = cfg.online
        http_warning = check_http_exposure(cfg, port=o.http_port) if serve_http else None
        if o.num_threads:
            torch.set_num_threads(o.num_threads)
        self.buffer = EventBuffer(o.recent_buffer, o.reservoir_buffer, cfg.model.max_len, seed=cfg.train.seed)
        self.live = LiveWatch(o)
        self._watched: tuple[str, str | None] | None = None  # (serving version, its parent when an online round's)
        self.versions = VersionLog(cfg, self.store, who="trainer")
        self.versions.catch_up()
        self.learner = OnlineLearner(cfg, self.store, self.versions)
        self.metrics, self.health = TrainerMetrics(), TrainerHealth(stall_after_s=cfg.stream.stall_after_s)
        self.metrics.learning_rate.set(self.learner.lr)
        self._seed_last_published()
        self.lag: int | None = None
        self._lag_at = 0.0
        self.examples = Consumer(librdkafka_config(cfg, **{"group.id": o.group_id, "auto.offset.reset": "earliest",
                                                           "enable.auto.commit": True}))
        self.examples.assign(resume_positions(self.examples, cfg.topics.training_examples))
        self.requests = UpdateFollower(cfg)  # refresh requests from operators
        self.last_round = time.monotonic()
        self.seen_at_round = 0  # buffer.seen when the last round ran
        self.requested = False
        self.recent_rounds = recent_rounds(self.store.root / "rounds.jsonl")  # for the operator page
        self.http = TrainerHttp(cfg.http.host, o.http_port, cfg.http.token, self.health_report,
                                self.render_metrics, self.render_page).start() if serve_http else None
        if http_warning:
            log.warning(http_warning)

    def _seed_last_published(self) -> None:
        """Before this trainer's first publish, the last one is the serving version's creation: a restart does
        not reset the age an operator alerts on."""
        serving = self.store.current()
        if serving is None:
            return
        try:
            self.metrics.last_published.set(self.store.info(serving).created)
        except ModelStoreError as exc:
            log.warning("the serving version %s has no readable info (%s): no publish time to show", serving, exc)

    def render_metrics(self) -> bytes:
        """/metrics, with the health state worked out now (a stall is a matter of time, not of an event)."""
        self.health_report()
        return self.metrics.render()

    def health_report(self) -> tuple[dict[str, Any], int]:
        from trainer.service import health_body

        status, reason = self.health.report(self.lag)
        self.metrics.set_health(status)
        return health_body(status, reason, serving=self.learner.version, new_events=self.buffer.new_events,
                           buffer_users=len(self.buffer.users), examples_lag=self.lag)

    def page_state(self) -> dict[str, Any]:
        """What the operator page shows (trainer/page.py): the store's pointers, the last round records, the
        live tallies, the consumer lag and the health."""
        body, _ = self.health_report()
        return {"serving": self.store.pinned() or self.store.current(), "current": self.store.current(),
                "pinned": self.store.pinned(), "shadow": self.store.shadow(), "rounds": list(self.recent_rounds),
                "live": {v: {"events": t.events, "hits": t.hits} for v, t in list(self.live.tallies.items())},
                "lag": self.lag, "health": {k: body[k] for k in ("status", "reason") if k in body},
                "now": time.time()}

    def render_page(self) -> str:
        from trainer.page import render_page

        return render_page(self.page_state())

    def poll(self, timeout_s: float = 0.5) -> int:
        from confluent_kafka import KafkaException

        try:
            messages = self.examples.consume(num_messages=2000, timeout=timeout_s)
        except KafkaException as exc:
            self.health.poll_failed(exc)
            return 0
        n, before = 0, self.buffer.seen
        for msg in messages:
            if msg.error():
                continue
            try:
                ex = decode_example(msg.value())
            except BadExample:
                log.warning("ignoring malformed training example at %s[%d]@%d", msg.topic(), msg.partition(),
                            msg.offset())
                continue
            self.buffer.add(ex.user_id, ex.items, ex.new)
            self.live.add(ex.user_id, ex.live)
            n += 1
        self.health.polled(examples=n)
        self.metrics.observe_poll(n, self.buffer.seen - before)
        self.metrics.observe_buffer(len(self.buffer.users), self.buffer.seen)
        self.metrics.observe_live(self.live)
        self._observe_lag()
        while (message := self.requests.next_message(0)) is not None:
            if message.get("request") == "refresh":
                self.requested = True
        try:
            self.versions.poll(0)  # what serves now (a rollback, another publisher's version) into the store
        except Exception as exc:
            self.health.poll_failed(exc)
        return n

    def _observe_lag(self) -> None:
        """Training examples in the topic not consumed yet (looked up every few seconds)."""
        from confluent_kafka import KafkaException

        if time.monotonic() - self._lag_at < self.LAG_EVERY_S:
            return
        self._lag_at = time.monotonic()
        try:
            lag = 0
            for tp in self.examples.position(self.examples.assignment()):
                _, high = self.examples.get_watermark_offsets(tp, timeout=2)
                lag += max(0, high - tp.offset) if tp.offset >= 0 else high
            self.lag = lag
        except KafkaException:
            self.lag = None
        self.metrics.observe_lag(self.lag)

    def due(self) -> bool:
        """A round when there are new events and: an operator asked, ``every_events`` arrived since the last
        round (so a refused round is not retried at once on the same data), or ``every_seconds`` passed."""
        o = self.cfg.online
        if self.buffer.new_events == 0:
            return False
        return (self.requested or self.buffer.seen - self.seen_at_round >= o.every_events
                or time.monotonic() - self.last_round >= o.every_seconds)

    def round(self) -> RoundResult:
        """One round; a round that raises (store unreadable, disk full) is recorded, /health says so, and the
        loop goes on."""
        self.health.round_started()
        try:
            result = self.learner.round(self.buffer)
            self.health.round_done()
        except Exception as exc:  # the service outlives one bad round
            log.exception("round failed")
            self.health.round_failed(exc)
            result = RoundResult(refused="error", reason=f"{type(exc).__name__}: {exc}")
        self.requested, self.last_round, self.seen_at_round = False, time.monotonic(), self.buffer.seen
        self.log(result.line())
        record = result.record(self.buffer)
        self.metrics.observe_round(record)
        self.metrics.learning_rate.set(self.learner.lr)
        self.recent_rounds.append(record)
        with (self.store.root / "rounds.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        return result

    def watch(self) -> Judgement | None:
        """The serving version judged on live events against its parent once there are enough of them
        (trainer/live.py), and rolled back when it serves worse: the parent becomes @current again (not pinned:
        the next rounds publish and serve as usual), the events the version learnt from are new again, and the
        rollback is logged, counted and appended to ``<model store>/rollbacks.jsonl``."""
        serving = self.store.current()
        if serving is None or self.store.pinned() is not None:
            return None
        if self._watched is None or self._watched[0] != serving:
            try:
                info = self.store.info(serving)
            except ModelStoreError:
                return None
            self._watched = (serving, info.parent if info.notes.get("source") == "online" else None)
        parent = self._watched[1]
        verdict = self.live.judge(serving, parent) if parent else None
        if verdict is None:
            return None
        self.log(verdict.line())
        if verdict.roll_back:
            self._roll_back(verdict)
        return verdict

    def _roll_back(self, verdict: Judgement) -> None:
        try:
            self.versions.push(verdict.parent, reason=f"rollback: {verdict.line()}")
        except Exception as exc:  # the parent's weights gone, the broker away: keep serving, say so
            log.error("could not roll %s back to %s: %s", verdict.version, verdict.parent, exc)
            return
        log.warning("rolled back: %s", verdict.line())
        before = self.learner.trained_before.get(verdict.version)
        if before is not None:
            self.buffer.trained = min(self.buffer.trained, before)
        self.metrics.rollbacks.inc()
        with (self.store.root / "rollbacks.jsonl").open("a") as f:
            f.write(json.dumps({"at": time.time(), **verdict.record()}) + "\n")

    def run(self, max_rounds: int | None = None) -> None:
        rounds = 0
        while max_rounds is None or rounds < max_rounds:
            self.poll()
            self.watch()
            if self.due():
                self.round()
                rounds += 1

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
        self.examples.close()
        self.requests.close()
        self.versions.close()
