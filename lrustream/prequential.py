"""Prequential ("test, then train") evaluation through the real pipeline: ``lrustream evaluate-stream``.

Contract:

* The data set's events are split in global time order: the first half ("warm") trains the starting model
  offline (or ``--start-model`` gives a stored one, to compare settings from one starting point), the second
  half is replayed through Kafka into a real worker, once per mode, every mode from the same starting model and
  in its own topics, state and model store (``OUT/runs/<mode>-<id>/``). Every mode replays the same events in
  the same order, so an event's source (partition, offset) in one mode's topic is that event's in another's.
* The starting model is trained with ``--start``: ``early-stop`` (the default) until ``train.patience``
  validations without a better one, ``train.max_steps`` lifted out of reach, with ``--train-minutes`` only as a
  cap; ``budget`` with ``train.*`` as configured, stopping at whichever of ``--train-minutes``,
  ``train.max_steps`` and ``train.patience`` comes first. The log says which one stopped it, and after how many
  steps.
* Each event is scored against the recommendation served to that user BEFORE it (the one emitted for the user's
  previous event): HR@10 and NDCG@10 over time.
* Modes (:data:`MODES`, any subset):
  ``frozen``     the worker alone, serving the starting model throughout;
  ``online``     the worker plus ``lrustream trainer`` fine-tuning and hot-swapping as the stream flows;
  ``reference``  what a generous nightly job does: every ``retrain_every`` replayed events producing pauses, the
  worker drains (a recommendation for every event produced so far), the model it serves (at first the starting
  model) is fine-tuned on warm + replayed-so-far until ``train.patience`` validations without a better one
  (``--train-minutes`` as a cap), published (reason "reference"), and producing resumes once the worker's
  ``GET /model`` reports it. Its vocabulary is the served one with the items new since appended in
  first-appearance order, so it extends the previous one, as the worker's re-derivation expects;
  ``retrain``    the same pauses, but each NEW model is trained from scratch with the starting model's recipe
  (``--start``) and ``--train-minutes`` on warm + replayed-so-far and published with reason "retrain". Its
  vocabulary lists items in first-appearance order over a longer prefix of the same events, so it extends the
  previous one too.
* Outputs in ``OUT``: ``prequential.csv`` and ``prequential.png`` (windowed and cumulative HR@10/NDCG@10 per
  bucket, one column set per mode) and ``summary.json``, the dict :func:`run_prequential` returns (see
  :func:`summarise`): per mode its means, versions and compute (online: its rounds' seconds; retrain and
  reference: each pause's training seconds and steps); where frozen ran, each other mode's HR@10 and NDCG@10
  difference from frozen on the events both scored, with a 95 % paired-bootstrap interval, and its HR@10 ratio to
  frozen on each eighth of those events; where online and reference ran, online's training seconds as a share
  of the reference's and (with frozen) online's HR@10 gain over frozen as a share of the reference's; where
  frozen ran, what its decay by eighth is made of (``decay``, :mod:`lrustream.decay`).
* When the online mode ran and published no version, :class:`OnlinePublishedNothing` is raised AFTER the outputs
  are written: an "online" curve that is the starting model under another name must not pass for a result.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lrustream.children import spawn_cli, stop, wait_healthy
from lrustream.decay import decay_lines, decompose
from lrustream.kernel.config import Config, TrainConfig, load_config
from lrustream.kernel.errors import LrustreamError

if TYPE_CHECKING:
    from trainer.loop import History

MODES = ("frozen", "online", "reference", "retrain")
PAUSING = ("reference", "retrain")  # the modes that pause the replay to publish a new model
STARTS = ("early-stop", "budget")  # how the starting model (and each retrain) is trained: see the module doc
EARLY_STOP_STEPS = 1_000_000_000  # train.max_steps of a run that only patience or the time cap stops
BOOTSTRAP_SAMPLES, CONFIDENCE = 1000, 0.95  # the intervals of the differences from frozen
Event = tuple[str, str, int]  # (user, item, timestamp)
Source = tuple[int, int]  # (partition, offset) of a replayed event in its mode's interactions topic
Sent = dict[Source, tuple[str, str]]  # (partition, offset) -> (user, item), from delivery reports
Scores = list[tuple[float, float]]  # (hit, ndcg) per scored event, in stream order
Pause = Callable[[int, Sent], None]  # called with (events produced so far, their delivery reports)
NextModel = Callable[[list[Event], str], tuple[Any, Any, "History"]]  # (seen, label) -> (model, vocab, history)


class OnlinePublishedNothing(LrustreamError):
    """The online run published no version, so its curve is the starting model's (``evaluate-stream`` exits 1).
    ``summary`` holds the numbers all the same."""

    def __init__(self, rounds: int, refused: dict[str, int], summary: dict[str, Any]) -> None:
        why = ", ".join(f"{code} {n}" for code, n in refused.items()) or "none"
        super().__init__(f"online learning published no version in {rounds} rounds (refused: {why})")
        self.summary = summary


@dataclass
class Replay:
    """What every mode shares: the starting point, the replayed half and the knobs."""

    base: list[str]
    root: Path
    warm: list[Event]
    events: list[Event]
    model: Any
    vocab: Any
    rate: float
    online_every: int
    retrain_every: int
    train_minutes: float
    log: Callable[[str], None]
    start: str = "early-stop"  # the starting model's recipe, in STARTS; retrains follow it too


@dataclass
class Refit:
    """One pause's new model (retrain, reference): its training seconds (not the waiting) and steps."""

    seconds: float
    steps: int


@dataclass
class ModeRun:
    """What one mode's replay produced."""

    scores: Scores
    versions: list[str]  # model versions the recommendations came from
    rounds: list[dict[str, Any]] = field(default_factory=list)  # online: the trainer's rounds.jsonl
    refits: list[Refit] = field(default_factory=list)  # retrain, reference: each pause's new model
    replayed: int = 0  # events replayed
    version_starts: list[int] = field(default_factory=list)  # replayed event number where each version began
    sources: list[Source] = field(default_factory=list)  # the source of each of ``scores``, in the same order
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (user, item) of each of ``scores``, same order


def parse_modes(text: str) -> tuple[str, ...]:
    """``"online,frozen"`` -> the named modes in :data:`MODES` order; ValueError for an empty or unknown one."""
    asked = {m.strip() for m in text.split(",") if m.strip()}
    if not asked or asked - set(MODES):
        raise ValueError(f"--modes takes a comma-separated subset of {','.join(MODES)}, got {text!r}")
    return tuple(m for m in MODES if m in asked)


def split_events(data: str, limit: int | None) -> tuple[list[Event], list[Event]]:
    from trainer.data import load_sequences

    events = list(load_sequences(data).events())
    if limit:
        events = events[:limit]
    cut = len(events) // 2
    return events[:cut], events[cut:]


def train_recipe(cfg: Config, start: str) -> TrainConfig:
    """``train.*`` for ``start``: ``budget`` as configured; ``early-stop`` with ``max_steps`` out of reach, so that
    only ``train.patience`` or the time cap stops the run."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    return cfg.train if start == "budget" else dataclasses.replace(cfg.train, max_steps=EARLY_STOP_STEPS)


def _vocabulary(known: list[str], events: list[Event]) -> Any:
    """``known`` followed by the items of ``events`` not in it, in first-appearance order."""
    from models.vocab import Vocabulary

    return Vocabulary([*known, *(item for _, item, _ in events)])


def _sequences(vocab: Any, events: list[Event]) -> list[np.ndarray]:
    """Each user's items as model ids (users with at least 3 events), in event order."""
    seqs: dict[str, list[int]] = {}
    for user, item, _ in events:
        seqs.setdefault(user, []).append(vocab.id_of(item))
    return [np.array(s) for s in seqs.values() if len(s) >= 3]


def _fit(cfg: Config, recipe: TrainConfig, model: Any, vocab: Any, events: list[Event], minutes: float,
         log: Callable[[str], None], label: str) -> History:
    """Train ``model`` on ``events`` (leave-one-out; ``vocab`` holds their items) and log how it went; the model
    is left on the CPU, in eval mode, with its best-validation weights."""
    from trainer.loop import train
    from trainer.optim import pick_device
    from trainer.samples import leave_one_out

    split = leave_one_out(_sequences(vocab, events), cfg.model.max_len)
    hist = train(model, split, recipe, pick_device(cfg.train.device), max_minutes=minutes,
                 progress=sys.stderr.isatty())
    log(f"{label}: {cfg.model.name} on {len(events)} events, {len(vocab)} items, {hist.steps_done} steps "
        f"({hist.seconds:.0f} s, stopped by {hist.stopped_because}); offline test NDCG@10 "
        f"{hist.test.get('NDCG@10', math.nan):.4f}")
    model.cpu().eval()
    return hist


def train_start_model(cfg: Config, warm: list[Event], minutes: float, log: Callable[[str], None],
                      label: str = "starting model", start: str = "early-stop") -> tuple[Any, Any, History]:
    """A model trained from scratch on ``warm`` only (for the starting model, nothing of the replayed half leaks
    in) with ``start``'s recipe (:func:`train_recipe`) and ``minutes``; items are numbered in first-appearance
    order. Returns the model, its vocabulary and the training history."""
    import torch

    from models import build_model, model_config

    recipe = train_recipe(cfg, start)
    vocab = _vocabulary([], warm)
    torch.manual_seed(cfg.train.seed)
    model = build_model(model_config(cfg.model), len(vocab))
    return model, vocab, _fit(cfg, recipe, model, vocab, warm, minutes, log, label)


def fine_tune(cfg: Config, model: Any, vocab: Any, seen: list[Event], minutes: float, log: Callable[[str], None],
              label: str) -> tuple[Any, Any, History]:
    """A copy of ``model`` (left as it is) fine-tuned on ``seen`` until ``train.patience`` validations without a
    better one (``minutes`` as a cap). Its vocabulary is ``vocab`` with the items new in ``seen`` appended in
    first-appearance order (``vocab`` a prefix of it, as the worker expects of a new version), its item tables
    grown to match (the new items' rows start at the OOV row, the known ones' at the served weights)."""
    tuned, grown = copy.deepcopy(model), _vocabulary(vocab.items(), seen)
    tuned.grow_items(len(grown))
    hist = _fit(cfg, train_recipe(cfg, "early-stop"), tuned, grown, seen, minutes, log, label)
    return tuned, grown, hist


class FineTuner:
    """Reference mode's next model: the one served now (at first the starting model) fine-tuned on everything
    seen (:func:`fine_tune`); the result is served next, so the next pause starts from it."""

    def __init__(self, cfg: Config, model: Any, vocab: Any, minutes: float, log: Callable[[str], None]) -> None:
        self.cfg, self.model, self.vocab, self.minutes, self.log = cfg, model, vocab, minutes, log

    def __call__(self, seen: list[Event], label: str) -> tuple[Any, Any, History]:
        self.model, self.vocab, hist = fine_tune(self.cfg, self.model, self.vocab, seen, self.minutes, self.log,
                                                 label)
        return self.model, self.vocab, hist


def starting_model(cfg: Config, warm: list[Event], minutes: float, log: Callable[[str], None],
                   keep: Path | None = None, start: str = "early-stop") -> tuple[Any, Any]:
    """The starting model and its vocabulary: the serving version of the model store ``keep`` when it has one (runs
    that compare settings then start from the same model), else :func:`train_start_model`'s with ``start``'s
    recipe, published there when ``keep`` is given."""
    from models.store import ModelStore

    store = ModelStore(keep) if keep is not None else None
    if store is not None and store.current() is not None:
        loaded = store.load()
        log(f"starting model: {loaded.info.version} of {keep} ({len(loaded.vocab)} items), not retrained")
        return loaded.model.eval(), loaded.vocab
    model, vocab, _ = train_start_model(cfg, warm, minutes, log, start=start)
    if store is not None:
        store.publish(model, vocab, notes={"source": "prequential start", "warm_events": len(warm)})
    return model, vocab


def _overrides(base: list[str], tag: str, root: Path, online_every: int) -> list[str]:
    # the trainer shares the cores with the worker, the broker and this replay: one torch thread (a default the
    # caller's overrides may change)
    return ["online.num_threads=1", *base, f"topics.interactions=preq-{tag}-in",
            f"topics.recommendations=preq-{tag}-out", f"topics.dlq=preq-{tag}-dlq",
            f"topics.state_changelog=preq-{tag}-changelog",
            f"topics.training_examples=preq-{tag}-train", f"topics.model_updates=preq-{tag}-updates",
            f"topics.items=preq-{tag}-items", f"topics.model_versions=preq-{tag}-versions",
            f"stream.app_id=preq-{tag}", f"online.group_id=preq-{tag}-trainer", f"state.dir={root / 'state'}",
            f"model_store.dir={root / 'models'}", "stream.unknown_items=oov", f"online.every_events={online_every}",
            "online.every_seconds=1000000", f"http.port={_free_port()}",
            f"online.http_port={_free_port()}"]


def _free_port() -> int:
    from lrustream.broker import free_port

    return free_port()


def _drain_timeout(events: int) -> float:
    return events / 200 + 120


def _produce(cfg: Config, events: list[Event], rate: float, every: int = 0, pause: Pause | None = None) -> Sent:
    """Send ``events`` at ``rate``; return their delivery reports. With ``pause``, after every ``every`` events
    (not after the last) flush and call ``pause(produced, sent)``; sending resumes when it returns."""
    from confluent_kafka import Producer

    from lrustream.kernel.kafka import produce, producer_config
    from lrustream.replay import Pacer, pace
    from stream.events import encode_event

    sent: Sent = {}
    producer = Producer(producer_config(cfg))
    pacer = Pacer(rate)  # forgives a stall (the pause) instead of catching it up in a burst

    def done(err, msg, what) -> None:  # type: ignore[no-untyped-def]
        if err is None:
            sent[(msg.partition(), msg.offset())] = what

    for n, (user, item, ts) in enumerate(events, 1):
        key, value = encode_event(user, item, ts)
        pace(producer, pacer.wait_s())  # poll() returns at the first delivery report: wait out the schedule
        produce(producer, cfg.topics.interactions, value, key,
                on_delivery=lambda e, m, w=(user, item): done(e, m, w))
        producer.poll(0)
        if pause is not None and n % every == 0 and n < len(events):
            producer.flush(60)
            pause(n, sent)
    producer.flush(60)
    return sent


class Recommendations:
    """The worker's recommendations topic, read from the beginning by assignment (no consumer group to join)."""

    def __init__(self, cfg: Config) -> None:
        from lrustream.kernel.kafka import assigned_reader

        self.consumer, _ = assigned_reader(cfg, cfg.topics.recommendations, "preq", from_beginning=True)
        self.records: list[dict] = []
        self.sources: set[tuple[int, int]] = set()  # the events answered so far

    def wait_for(self, events: int, timeout_s: float) -> bool:
        """Read until ``events`` distinct events have a recommendation or ``timeout_s`` passes; whether they do."""
        deadline = time.monotonic() + timeout_s
        while len(self.sources) < events and time.monotonic() < deadline:
            for m in self.consumer.consume(num_messages=5000, timeout=0.5):
                if not m.error():
                    rec = json.loads(m.value())
                    self.records.append(rec)
                    self.sources.add((rec["source"]["partition"], rec["source"]["offset"]))
        return len(self.sources) >= events

    def close(self) -> None:
        self.consumer.close()


def wait_serving(cfg: Config, version: str, timeout_s: float = 120) -> None:
    """Return when the worker's ``GET /model`` reports ``version``; RuntimeError when it refuses it or times out."""
    url = f"http://{cfg.http.host}:{cfg.http.port}/model"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                body = json.load(resp)
        except (OSError, ValueError):
            body = {}
        if body.get("version") == version:
            return
        refused = [s for s in body.get("swaps", []) if s.get("version") == version and not s.get("ok")]
        if refused:
            raise RuntimeError(f"the worker refused version {version}: {refused[-1].get('reason')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker does not serve version {version} after {timeout_s:.0f} s "
                               f"(still serving {body.get('version', '?')}); see its worker.log")
        time.sleep(0.25)


class Pauser:
    """The pause of the retrain and reference modes: drain (a recommendation for every event produced so far),
    make the next model from everything seen (warm + replayed so far) with ``next_model``, publish it with reason
    ``reason``, wait until the worker serves it."""

    def __init__(self, cfg: Config, plan: Replay, recs: Recommendations, reason: str, next_model: NextModel) -> None:
        self.cfg, self.plan, self.recs, self.reason, self.next_model = cfg, plan, recs, reason, next_model
        self.refits: list[Refit] = []  # each pause's training seconds (not the waiting) and steps

    def __call__(self, produced: int, sent: Sent) -> None:
        from stream.versions import publish_version

        if not self.recs.wait_for(len(sent), _drain_timeout(len(sent))):
            raise RuntimeError(f"{self.reason}: the worker answered {len(self.recs.sources)} of {len(sent)} events "
                               f"within {_drain_timeout(len(sent)):.0f} s; see its worker.log")
        seen = self.plan.warm + self.plan.events[:produced]
        t0 = time.monotonic()
        model, vocab, hist = self.next_model(seen, f"{self.reason} {len(self.refits) + 1}")
        self.refits.append(Refit(time.monotonic() - t0, hist.steps_done))
        info = publish_version(self.cfg, model, vocab, who="prequential", reason=self.reason,
                               notes={"source": f"prequential {self.reason}", "events": len(seen)})
        wait_serving(self.cfg, info.version)


def pauser(mode: str, cfg: Config, plan: Replay, recs: Recommendations) -> Pauser | None:
    """The pause of ``mode`` (None for a mode that does not pause): retrain trains from scratch with the starting
    model's recipe, reference fine-tunes the served model (:class:`FineTuner`)."""
    if mode == "retrain":
        def retrain(seen: list[Event], label: str) -> tuple[Any, Any, History]:
            return train_start_model(cfg, seen, plan.train_minutes, plan.log, label, plan.start)

        return Pauser(cfg, plan, recs, mode, retrain)
    if mode == "reference":
        return Pauser(cfg, plan, recs, mode, FineTuner(cfg, plan.model, plan.vocab, plan.train_minutes, plan.log))
    return None


def first_answers(recs: list[dict]) -> dict[tuple[int, int], dict]:
    """The first recommendation emitted for each (partition, offset) of the input: a repeat after a crash or a
    retried batch does not count."""
    first: dict[tuple[int, int], dict] = {}
    for r in recs:
        first.setdefault((r["source"]["partition"], r["source"]["offset"]), r)
    return first


def scores_by_source(recs: list[dict], sent: Sent, k: int = 10) -> dict[Source, tuple[float, float]]:
    """(hit, ndcg) per scored event keyed by its source, in stream order: each event against the user's previous
    recommendation."""
    first = first_answers(recs)
    previous: dict[str, list[str]] = {}
    out: dict[Source, tuple[float, float]] = {}
    for source in sorted(sent, key=lambda s: (s[1], s[0])):
        user, item = sent[source]
        if user in previous:
            items = previous[user][:k]
            rank = items.index(item) if item in items else -1
            out[source] = (1.0 if rank >= 0 else 0.0, 1.0 / math.log2(rank + 2) if rank >= 0 else 0.0)
        rec = first.get(source)
        if rec is not None:
            previous[user] = rec["items"]
    return out


def score(recs: list[dict], sent: Sent, k: int = 10) -> Scores:
    """(hit, ndcg) per scored event, in stream order (:func:`scores_by_source` without the sources)."""
    return list(scores_by_source(recs, sent, k).values())


def version_starts(recs: list[dict], sent: Sent) -> list[int]:
    """For each served version, in order of appearance: the number (production order, from 0) of the first
    replayed event it answered."""
    first = first_answers(recs)
    starts, seen = [], set()
    for n, source in enumerate(sent):  # delivery-report order: the order the events were produced in
        version = first[source]["model_version"] if source in first else None
        if version is not None and version not in seen:
            seen.add(version)
            starts.append(n)
    return starts


def longest_without_new_version(starts: list[int], replayed: int) -> int:
    """The most replayed events in a row during which no new version began serving (start and end included)."""
    edges = [0, *starts[1:], replayed]
    return max(b - a for a, b in pairwise(edges))


def read_rounds(path: Path) -> list[dict[str, Any]]:
    """The trainer's round records (one JSON object a line); a line cut short by the stop is skipped."""
    from trainer.online import json_records

    return list(json_records(path.read_text().splitlines())) if path.exists() else []


def run_mode(mode: str, plan: Replay) -> ModeRun:
    """Replay ``plan.events`` through a fresh worker (plus a trainer, or a pause every ``plan.retrain_every``
    events for a new model) and score what it served."""
    from stream.topics import create_topics
    from stream.versions import publish_version

    tag = f"{mode}-{uuid.uuid4().hex[:6]}"
    mode_root = (plan.root / tag).resolve()
    mode_root.mkdir(parents=True, exist_ok=True)
    overrides = _overrides(plan.base, tag, mode_root, plan.online_every)
    cfg = load_config(overrides=overrides)
    create_topics(cfg)
    publish_version(cfg, plan.model, plan.vocab, who="prequential", notes={"source": "prequential start"})
    recs = Recommendations(cfg)
    procs = [spawn_cli(["worker", "--loglevel", "warning", *overrides], mode_root / "worker.log")]
    if mode == "online":
        procs.append(spawn_cli(["trainer", *overrides], mode_root / "trainer.log"))
    pause = pauser(mode, cfg, plan, recs)
    try:
        wait_healthy(cfg, procs[0], mode_root / "worker.log")
        if mode == "online":  # the trainer reads the examples from the start, but a replay must not outrun its
            wait_healthy(cfg, procs[1], mode_root / "trainer.log", port=cfg.online.http_port, what="trainer")
        t0 = time.monotonic()
        sent = _produce(cfg, plan.events, plan.rate, plan.retrain_every, pause)
        if not recs.wait_for(len(sent), _drain_timeout(len(sent))):
            plan.log(f"{mode}: only {len(recs.sources)} of {len(sent)} events got a recommendation in time")
    finally:
        stop(procs)
        recs.close()
    versions = sorted({r["model_version"] for r in recs.records})
    plan.log(f"{mode}: {len(sent)} events replayed, {len(recs.records)} recommendations in "
             f"{time.monotonic() - t0:.0f} s; {_versions_text(versions)}")
    rounds = read_rounds(Path(cfg.model_store.dir) / "rounds.jsonl") if mode == "online" else []
    scored = scores_by_source(recs.records, sent)
    return ModeRun(list(scored.values()), versions, rounds, pause.refits if pause else [], len(sent),
                   version_starts(recs.records, sent), list(scored), [sent[source] for source in scored])


def round_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds run, published, refused by reason code (most frequent first), their total wall seconds (training
    and gate: the records' "seconds") and the training part alone ("train_seconds")."""
    refused = Counter(str(r.get("refused") or "unknown") for r in records if not r.get("published"))
    return {"rounds": len(records), "published": sum(1 for r in records if r.get("published")),
            "refused": dict(refused.most_common()),
            "round_seconds": round(sum(float(r.get("seconds") or 0.0) for r in records), 2),
            "train_seconds": round(sum(float(r.get("train_seconds") or 0.0) for r in records), 2)}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def refit_stats(mode: str, refits: list[Refit]) -> dict[str, Any]:
    """A pausing mode's new models ("retrains" for retrain, "refits" for reference), their total training seconds
    and steps."""
    return {"retrains" if mode == "retrain" else "refits": len(refits),
            "train_seconds": round(sum(r.seconds for r in refits), 2), "train_steps": sum(r.steps for r in refits)}


def paired(run: ModeRun, other: ModeRun) -> tuple[np.ndarray, np.ndarray]:
    """The (hit, ndcg) rows of ``run`` and of ``other`` on the events both scored (the same source), in ``run``'s
    stream order: two arrays of shape (paired events, 2)."""
    theirs = dict(zip(other.sources, other.scores, strict=True))
    both = [(mine, theirs[src]) for src, mine in zip(run.sources, run.scores, strict=True) if src in theirs]
    return np.array([m for m, _ in both]).reshape(-1, 2), np.array([t for _, t in both]).reshape(-1, 2)


def eighth_ratios(hits: np.ndarray, frozen_hits: np.ndarray) -> list[float | None]:
    """HR@10 of ``hits`` over that of the paired ``frozen_hits`` on each eighth of the events, in order (None where
    frozen's is 0 or the eighth is empty)."""
    return [round(float(a.mean() / b.mean()), 4) if b.size and b.mean() > 0 else None
            for a, b in zip(np.array_split(hits, 8), np.array_split(frozen_hits, 8), strict=True)]


def versus_frozen(run: ModeRun, frozen: ModeRun) -> dict[str, Any]:
    """``run`` against frozen on the events both scored: for HR@10 and NDCG@10 the mean difference (run - frozen)
    and its :data:`CONFIDENCE` paired-bootstrap percentile interval ({"diff", "low", "high"}), the HR@10 ratio on
    each eighth of those events in stream order ("eighths") and their number ("paired"); "paired" alone when
    there are none."""
    from trainer.gate import paired_bootstrap

    mine, theirs = paired(run, frozen)
    out: dict[str, Any] = {}
    if len(mine):
        for col, metric in enumerate(("HR@10", "NDCG@10")):
            diff = mine[:, col] - theirs[:, col]
            low, high = paired_bootstrap(diff, BOOTSTRAP_SAMPLES, CONFIDENCE)
            out[metric] = {"diff": round(float(diff.mean()), 6), "low": round(low, 6), "high": round(high, 6)}
        out["eighths"] = eighth_ratios(mine[:, 0], theirs[:, 0])
    return out | {"paired": len(mine)}


def _share(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole > 0 else None


def online_vs_reference(modes: dict[str, dict[str, Any]], versus: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Where online and reference ran: online's training seconds as a share of the reference's
    ("train_seconds_share") and, where both were paired with frozen, online's HR@10 gain over frozen as a share of
    the reference's ("hr10_gain_share", the gain captured); a share is None where the reference's is not above 0."""
    if "online" not in modes or "reference" not in modes:
        return {}
    out = {"train_seconds_share": _share(modes["online"]["train_seconds"], modes["reference"]["train_seconds"])}
    gains = [versus.get(mode, {}).get("HR@10", {}).get("diff") for mode in ("online", "reference")]
    if None not in gains:
        out["hr10_gain_share"] = _share(*gains)
    return out


def summarise(runs: dict[str, ModeRun], warm: list[Event] | None = None) -> dict[str, Any]:
    """``{"modes": {mode: {"HR@10", "NDCG@10", "scored", "versions", "longest_without_new_version" (replayed
    events in a row that no new version began in)} plus, for online, "rounds", "published",
    "refused" {code: n}, "round_seconds", "train_seconds"; for retrain, "retrains", "train_seconds",
    "train_steps"; for reference, "refits", "train_seconds", "train_steps"},
    "ratios": {"online/frozen": HR@10 ratio, "online/reference": ..., "online/retrain": ...},
    "versus_frozen": {mode: :func:`versus_frozen`}, "online_vs_reference": :func:`online_vs_reference`}`` (a
    ratio only where both modes ran and the denominator is not 0; "versus_frozen" empty where frozen did not
    run), plus "decay" (:func:`lrustream.decay.decompose` of the frozen run after ``warm``) where frozen ran with
    its events recorded and ``warm`` is given."""
    modes: dict[str, dict[str, Any]] = {}
    for mode, run in runs.items():
        m: dict[str, Any] = {"HR@10": _mean([h for h, _ in run.scores]), "NDCG@10": _mean([g for _, g in run.scores]),
                             "scored": len(run.scores), "versions": run.versions}
        if run.replayed:
            m["longest_without_new_version"] = longest_without_new_version(run.version_starts, run.replayed)
        if mode == "online":
            m |= round_stats(run.rounds)
        if mode in PAUSING:
            m |= refit_stats(mode, run.refits)
        modes[mode] = m
    ratios = {f"online/{other}": round(modes["online"]["HR@10"] / modes[other]["HR@10"], 4)
              for other in ("frozen", "reference", "retrain")
              if "online" in modes and other in modes and modes[other]["HR@10"] > 0}
    versus = {mode: versus_frozen(run, runs["frozen"]) for mode, run in runs.items()
              if mode != "frozen" and "frozen" in runs}
    out = {"modes": modes, "ratios": ratios, "versus_frozen": versus,
           "online_vs_reference": online_vs_reference(modes, versus)}
    frozen = runs.get("frozen")
    if warm is not None and frozen is not None and len(frozen.pairs) == len(frozen.scores) > 0:
        out["decay"] = decompose([(user, item) for user, item, _ in warm], frozen.pairs,
                                 [hit for hit, _ in frozen.scores])
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _versions_text(versions: list[str]) -> str:
    span = versions[0] if len(versions) == 1 else f"{versions[0]}..{versions[-1]}" if versions else "none"
    return f"{_plural(len(versions), 'version')} served ({span})"


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


INDENT = " " * 10


def _versus_lines(v: dict[str, Any]) -> list[str]:
    """A mode's comparison with frozen: the intervals, then the eighths."""
    if "HR@10" not in v:
        return [f"{INDENT}vs frozen: no event scored in both"]
    intervals = "  ".join(f"{metric} {v[metric]['diff']:+.4f} [{v[metric]['low']:+.4f}, {v[metric]['high']:+.4f}]"
                          for metric in ("HR@10", "NDCG@10"))
    eighths = " ".join("-" if r is None else f"{r:.2f}" for r in v["eighths"])
    return [f"{INDENT}vs frozen, {CONFIDENCE:.0%} CI: {intervals}",
            f"{INDENT}HR@10 / frozen by eighth of the {v['paired']} paired events: {eighths}"]


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as a few short lines for the terminal."""
    lines = []
    for mode, m in summary["modes"].items():
        lines.append(f"{mode:9s} HR@10 {m['HR@10']:.4f}  NDCG@10 {m['NDCG@10']:.4f}  {m['scored']} scored; "
                     f"{_versions_text(m['versions'])}")
        if "rounds" in m:
            refused = ", ".join(f"{code} {n}" for code, n in m["refused"].items()) or "none"
            lines.append(f"{INDENT}{_plural(m['rounds'], 'round')}: {m['published']} published, refused: {refused}; "
                         f"{m['round_seconds']:.0f} s ({m['train_seconds']:.0f} s training); a new version within "
                         f"every {m.get('longest_without_new_version', '?')} events")
        for word in ("retrain", "refit"):
            if f"{word}s" in m:
                lines.append(f"{INDENT}{_plural(m[f'{word}s'], word)}: {m['train_seconds']:.0f} s of training, "
                             f"{m['train_steps']} steps")
        if mode in summary["versus_frozen"]:
            lines += _versus_lines(summary["versus_frozen"][mode])
    if summary["ratios"]:
        lines.append("HR@10 " + ", ".join(f"{k} {v:.2f}x" for k, v in summary["ratios"].items()))
    both = summary["online_vs_reference"]
    if both:
        gain = "" if "hr10_gain_share" not in both else (
            f", {_percent(both['hr10_gain_share'])} of its HR@10 gain over frozen (gain captured)")
        lines.append(f"online/reference: {_percent(both['train_seconds_share'])} of its training seconds{gain}")
    if "decay" in summary:
        lines.append("frozen by eighth of the replay (where its decay comes from):")
        lines += decay_lines(summary["decay"], INDENT)
    return lines


def write_outputs(results: dict[str, Scores], out: Path, bucket: int) -> tuple[Path, Path]:
    """CSV of HR@10/NDCG@10 per bucket of scored events (windowed and cumulative) and a PNG of every curve."""
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


def finish(runs: dict[str, ModeRun], out: Path, bucket: int, log: Callable[[str], None],
           warm: list[Event] | None = None) -> dict[str, Any]:
    """Write the CSV, PNG and summary.json, print the summary; then :class:`OnlinePublishedNothing` if due."""
    csv_path, png_path = write_outputs({mode: run.scores for mode, run in runs.items()}, out, bucket)
    summary = summarise(runs, warm)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for line in summary_lines(summary):
        log(line)
    log(f"wrote {csv_path.name}, {png_path.name} and summary.json in {out}")
    online = summary["modes"].get("online")
    if online is not None and not online["published"]:
        raise OnlinePublishedNothing(online["rounds"], online["refused"], summary)
    return summary


def run_prequential(base: list[str], data: str, out: Path, limit: int | None, rate: float, train_minutes: float,
                    online_every: int, bucket: int, modes: Sequence[str] = MODES, retrain_every: int = 50_000,
                    log: Callable[[str], None] = print, start_model: Path | None = None,
                    start: str = "early-stop") -> dict[str, Any]:
    """Run ``modes`` from one starting model (trained with ``start``'s recipe unless ``start_model`` holds one),
    write the outputs, return the summary (see :func:`summarise`)."""
    if set(PAUSING) & set(modes) and retrain_every < 1:
        raise ValueError(f"retrain_every must be >= 1, got {retrain_every}")
    cfg = load_config(overrides=base)
    train_recipe(cfg, start)  # an unknown start fails before the data set is read
    warm, events = split_events(data, limit)
    model, vocab = starting_model(cfg, warm, train_minutes, log, keep=start_model, start=start)
    plan = Replay(base, out / "runs", warm, events, model, vocab, rate, online_every, retrain_every,
                  train_minutes, log, start)
    runs = {mode: run_mode(mode, plan) for mode in MODES if mode in modes}
    return finish(runs, out, bucket, log, warm)
