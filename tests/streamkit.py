"""Test helpers for the streaming path: a tiny published model, a worker subprocess, topic readers.

Workers run as real ``lrustream worker`` processes (so SIGKILL means what it means in production) against
the session's real Kafka broker.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from confluent_kafka import Consumer, Producer

from lrustream.broker import free_port
from lrustream.kernel.config import Config, StateConfig, StreamConfig, load_config
from lrustream.kernel.kafka import high_watermarks, librdkafka_config, produce_all, producer_config, topic_partitions
from models import LRURecConfig, SeqRecModel, build_model, config_class
from models.store import META, VOCAB, WEIGHTS, ModelStore
from models.vocab import Vocabulary
from state.store import StateStore, find_user
from stream.processor import Processor
from stream.serving import Serving
from stream.topics import create_topics
from stream.versions import publish_version
from stream.worker import state_dir

REPO = Path(__file__).resolve().parent.parent


def small_model(cfg: Config, name: str = "lrurec", num_items: int = 40, seed: int = 0,
                **hp: object) -> tuple[SeqRecModel, Vocabulary]:
    """A small randomly initialised model with items i1..iN; ``hp`` overrides fields of model ``name``'s config."""
    torch.manual_seed(seed)
    params = {"d_model": 16, "num_layers": 2, "max_len": cfg.model.max_len, "dropout": 0.0, **hp}
    return build_model(config_class(name)(**params), num_items), Vocabulary(f"i{k}" for k in range(1, num_items + 1))


def publish_model(cfg: Config, name: str = "lrurec", num_items: int = 40, seed: int = 0, local: bool = False,
                  **hp: object) -> str:
    """:func:`small_model`, published as the serving version on the model-versions topic (``local``: into the
    model store alone, no broker)."""
    model, vocab = small_model(cfg, name, num_items, seed, **hp)
    if local:
        return ModelStore(cfg.model_store.dir).publish(model, vocab).version
    create_topics(cfg)
    return publish_version(cfg, model, vocab, who="test").version


def version_files(cfg: Config, version: str, scratch: Path, seed: int = 0, num_items: int = 40) -> dict[str, bytes]:
    """The files of :func:`small_model` as version ``version`` (meta.json, vocab.json, weights), not published."""
    folder, _ = ModelStore(scratch).prepare(*small_model(cfg, num_items=num_items, seed=seed), version)
    return {name: (folder / name).read_bytes() for name in (META, VOCAB, WEIGHTS)}


def upload_raw(cfg: Config, version: str, files: dict[str, bytes], chunk_bytes: int = 4096,
               alter: Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]] | None = None) -> None:
    """``files`` written to the model-versions topic record by record, as stream/versions.py's contract lets any
    producer: their chunks (after ``alter``, a test's way to lose or change some), the ``done`` record describing
    ``files`` as given, then ``@current``."""
    upload = uuid.uuid4().hex[:12]
    chunks = [(f"{version}/{upload}/{name}/{offset}".encode(), data[offset:offset + chunk_bytes])
              for name, data in files.items() for offset in range(0, len(data), chunk_bytes)]
    done = {"version": version, "upload": upload, "chunk_bytes": chunk_bytes, "ts": 0, "by": "test",
            "files": [{"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()],
            "sha256": hashlib.sha256(b"".join(files.values())).hexdigest()}
    pointer = {"version": version, "reason": "test", "by": "test", "ts": 0}
    done_record = (f"{version}/{upload}/done".encode(), json.dumps(done).encode())
    produce_all(Producer(producer_config(cfg)), cfg.topics.model_versions,
                [*(alter(chunks) if alter else chunks), done_record, (b"@current", json.dumps(pointer).encode())])


def event_value(user: str, item: str, ts: int) -> bytes:
    return json.dumps({"user_id": user, "item_id": item, "ts": ts}).encode()


def produce(cfg: Config, records: Iterable[tuple[bytes | None, ...]]) -> int:
    """Produce (key, value) or (key, value, headers) records to the interactions topic with the project's
    partitioner, up to the broker's record limit; wait for acks."""
    producer = Producer(producer_config(cfg, **{"message.max.bytes": 1_048_576}))
    return produce_all(producer, cfg.topics.interactions, records)


def read_topic(cfg: Config, topic: str, expect: int | None = None, timeout_s: float = 60.0,
               idle_s: float = 3.0) -> list:
    """Every record of a topic: until ``expect`` records arrived, or nothing new for ``idle_s`` seconds."""
    consumer = Consumer(librdkafka_config(cfg, **{"group.id": f"read-{uuid.uuid4().hex[:6]}",
                                                  "auto.offset.reset": "earliest", "enable.auto.commit": False}))
    consumer.subscribe([topic])
    out: list = []
    deadline = time.monotonic() + timeout_s
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            msgs = consumer.consume(num_messages=1000, timeout=0.5)
            good = [m for m in msgs if not m.error()]
            out += good
            if good:
                last_new = time.monotonic()
            if expect is not None and len(out) >= expect:
                if time.monotonic() - last_new > 1.0:  # linger a moment to catch extras
                    break
            elif expect is None and out and time.monotonic() - last_new > idle_s:
                break
    finally:
        consumer.close()
    return out


def recommendations(cfg: Config, expect: int | None = None, timeout_s: float = 90.0) -> list[dict]:
    return [json.loads(m.value()) for m in read_topic(cfg, cfg.topics.recommendations, expect, timeout_s)]


def end_offsets(cfg: Config, topic: str) -> dict[int, int]:
    consumer = Consumer(librdkafka_config(cfg, **{"group.id": "offsets"}))
    try:
        return high_watermarks(consumer, topic, topic_partitions(consumer, topic))
    finally:
        consumer.close()


@dataclass
class WorkerProcess:
    """``lrustream worker`` in a subprocess with the test's overrides (plus its own HTTP port/state dir)."""

    overrides: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    port: int = 0

    def start(self, extra: list[str] | None = None) -> WorkerProcess:
        self.port = free_port()
        args = [sys.executable, "-P", "-m", "lrustream.cli", "worker", "--loglevel", "warning",
                *self.overrides, f"http.port={self.port}", *(extra or [])]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        return self

    def get(self, path: str, timeout: float = 2.0) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as resp:
            return resp.read()

    def health(self) -> dict:
        """/health's body, whether it says ok (200) or degraded (503)."""
        try:
            return json.loads(self.get("/health"))
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def get_metric(self, name: str) -> float:
        """A metric's value from /metrics (0 while the worker is not answering)."""
        try:
            text = self.get("/metrics").decode()
        except OSError:
            return 0.0
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def wait_healthy(self, timeout_s: float = 90.0) -> dict:
        """/health's body once it says ok (200): a readiness wait. A degraded answer keeps it waiting, so a test
        that asserts on the status reads ``health()``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                return json.loads(self.get("/health"))
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"worker not healthy after {timeout_s} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): no heartbeats, a batch in flight stays in flight."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def build_processor(cfg: Config, serving: Serving, store: StateStore, producer: Any,
                    stream: StreamConfig | None = None, **collaborators: Any) -> Processor:
    """A Processor run in process, by default as these tests have always run it: the stream section's defaults
    without training examples, states stored as the state section's default dtype, ``cfg``'s topics;
    ``collaborators`` (fetch, metrics, vocab_of) as the Worker would pass them."""
    return Processor(serving, store, producer, stream=stream or StreamConfig(emit_training_examples=False),
                     topics=cfg.topics, state_dtype=StateConfig().dtype, **collaborators)


def local_processor(tmp_path: Path, producer: Any, name: str = "state", stream: StreamConfig | None = None
                    ) -> tuple[Processor, Config]:
    """A Processor (as :func:`build_processor` builds it) serving a small LRURec of 40 items, published once into
    ``tmp_path``'s model store, with a state store of its own under ``tmp_path / name``: the unit tier's processor,
    no broker. Returns it with its configuration."""
    cfg = load_config(overrides=[f"model_store.dir={tmp_path / 'models'}"])
    store = ModelStore(cfg.model_store.dir)
    if store.current() is None:
        torch.manual_seed(0)
        store.publish(build_model(LRURecConfig(d_model=16, num_layers=1, max_len=20), 40),
                      Vocabulary(f"i{k}" for k in range(1, 41)))
    return build_processor(cfg, Serving.load(store), StateStore(tmp_path / name), producer, stream), cfg


def reference(cfg: Config, events: list[tuple[str, str]], top_k: int = 10, version: str | None = None
              ) -> dict[str, dict]:
    """What serving each user's events one by one, offline, gives: per user the list of top-K lists (and
    scores) and the final state bytes. The specification the worker is checked against."""
    serving = Serving.load(ModelStore(cfg.model_store.dir), version)
    model, vocab = serving.model, serving.vocab
    per_user: dict[str, list[str]] = {}
    for user, item in events:
        per_user.setdefault(user, []).append(item)
    out = {}
    with torch.inference_mode():
        for user, items in per_user.items():
            state, seen, recs = model.init_state(1), [], []
            for item in items:
                idx = vocab.id_of(item)
                state, h = model.step(state, torch.tensor([idx]))
                seen = ([*seen, idx])[-model.max_len:]
                scores = model.score(h)[0]
                scores[torch.tensor(seen)] = float("-inf")
                top = torch.topk(scores, top_k)
                pairs = zip(top.indices.tolist(), top.values.tolist(), strict=True)
                keep = [(i, v) for i, v in pairs if v != float("-inf")]
                recs.append(([vocab.item_of(i) for i, _ in keep], [v for _, v in keep]))
            out[user] = {"recs": recs, "state": model.state_to_bytes(state)[0], "window": seen}
    return out


# ----- helpers ------------------------------------------------------------------------------------------------
def ring_stream(users: int, events: int, items: int = 40, step: int = 1, seed: int = 0,
                starts: list[int] | None = None) -> list[tuple[str, str]]:
    """Users walking a ring of items by ``step``, interleaved in time: a rule a few steps can pick up."""
    rng = random.Random(seed)
    pos = starts or [rng.randrange(items) for _ in range(users)]
    out = []
    for _ in range(events):
        u = rng.randrange(users)
        pos[u] = (pos[u] + step) % items
        out.append((f"u{u}", f"i{pos[u] + 1}"))
    return out


def synthetic_events(n: int, users: int, items: int = 40, seed: int = 1) -> list[tuple[str, str]]:
    """Skewed activity so that micro-batches hold several events of one user (several step waves)."""
    rng = random.Random(seed)
    weights = [1.0 / (u + 1) for u in range(users)]
    return [(f"u{rng.choices(range(users), weights)[0]}", f"i{rng.randint(1, items)}") for _ in range(n)]


EVENTS_TS0 = 1_700_000_000_000  # the broker timestamp of produce_events' first event, by default


def produce_events(cfg: Config, events: Iterable[tuple[str, str]], ts0: int = EVENTS_TS0) -> None:
    produce(cfg, ((u.encode(), event_value(u, i, ts0 + k)) for k, (u, i) in enumerate(events)))


def produce_paced(cfg: Config, events: list[tuple[str, str]], rate: float, first: int = 0,
                  hurry: threading.Event | None = None) -> None:
    """``events`` at ``rate`` events/s, numbered from ``first`` as produce_events numbers them (the timestamps
    go on from there), the rest at once when ``hurry`` is set: for a test that needs the stream still flowing at
    some moment (a kill, an outage), however fast the worker drains or slowly it restarts. Run it on a thread; a
    producer buffers what a missing broker cannot take."""
    def paced() -> Iterable[tuple[str, str]]:
        for event in events:
            if hurry is None or not hurry.is_set():
                time.sleep(1 / rate)
            yield event

    produce_events(cfg, paced(), ts0=EVENTS_TS0 + first)


def stored_states(cfg: Config, users: set[str]) -> dict[str, tuple[bytes, int]]:
    out = {}
    for user in users:
        found = find_user(state_dir(cfg), user)
        assert found is not None, f"no state stored for {user}"
        out[user] = (found[1].state, found[1].offset)
    return out


def wait_for_version(worker: WorkerProcess, version: str, timeout_s: float = 30.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if json.loads(worker.get("/model"))["version"] == version:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"worker still serves {json.loads(worker.get('/model'))['version']}, not {version}")
