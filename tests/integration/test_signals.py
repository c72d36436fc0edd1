"""The stop signals' contract (stream/worker.py, ``Worker.stop_processing``; ``stream.stop_timeout_s``): after
SIGTERM or SIGINT a worker exits within ``stream.stop_timeout_s`` (+ STOP_SLACK_S for the signal's delivery and
the process's exit), and every event it had not committed is redelivered to the partitions' next owner and
applied there exactly once.

A rolling restart on the real broker, mid-stream, the events flowing at a steady pace: the first worker gets
SIGTERM, the second (another state directory: it restores from the changelog) SIGINT, a third drains the rest.
Both stopped workers commit only at their stop (``stream.commit_interval_ms`` is a minute), so at the signal they
hold every event they applied. Exactly once is checked per user on the last worker's stored window: each user has
fewer events than ``model.max_len``, so the window lists every event applied to the user, in order; an event lost
is missing from it, an event applied twice appears twice."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from pathlib import Path

from lrustream.kernel.config import Config, load_config
from models.store import ModelStore
from state.store import find_user
from stream.serving import Serving
from stream.topics import create_topics
from stream.worker import state_dir
from tests.streamkit import WorkerProcess, produce_events, produce_paced, publish_model, recommendations

STOP_SLACK_S = 1.0  # the contract's margin past stream.stop_timeout_s: the signal's delivery, the process's exit
HOLD = ["stream.batch_size=32", "stream.commit_interval_ms=60000"]  # commit only at the stop


def spread_events(n: int, users: int, seed: int = 21) -> list[tuple[str, str]]:
    """``n`` events, each user's ``n / users`` interleaved with the others' (a user's window then lists them all)."""
    rng = random.Random(seed)
    return [(f"u{k % users}", f"i{rng.randint(1, 40)}") for k in range(n)]


def stop_with(worker: WorkerProcess, signum: signal.Signals, timeout_s: float = 60.0) -> float:
    """Send ``signum``; the seconds until the process has exited."""
    assert worker.proc is not None and worker.proc.poll() is None, f"the worker had exited:\n{worker.tail()}"
    t0 = time.monotonic()
    worker.proc.send_signal(signum)
    try:
        worker.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        worker.kill()
    return time.monotonic() - t0


def wait_served(worker: WorkerProcess, at_least: float, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while worker.get_metric("lrustream_recommendations_total") < at_least:
        assert time.monotonic() < deadline, f"the worker served too few events:\n{worker.tail()}"
        time.sleep(0.1)


def wait_all_sources(cfg: Config, n: int, timeout_s: float = 120.0) -> None:
    """Until every one of the ``n`` input events has a recommendation (duplicates allowed: outputs are at least
    once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        recs = recommendations(cfg, expect=n, timeout_s=max(1.0, deadline - time.monotonic()))
        sources = {(r["source"]["partition"], r["source"]["offset"]) for r in recs}
        if len(sources) >= n or time.monotonic() > deadline:
            assert len(sources) == n, f"{n - len(sources)} events produced no recommendation"
            return


def applied_items(cfg: Config, users: set[str]) -> dict[str, list[str]]:
    """Per user, the items of the events applied to the user's state, in order (the stored window)."""
    vocab = Serving.load(ModelStore(cfg.model_store.dir)).vocab
    out = {}
    for user in users:
        found = find_user(state_dir(cfg), user)
        assert found is not None, f"no state stored for {user}"
        out[user] = found[1].external_window(vocab.item_of)
    return out


def assert_applied_exactly_once(cfg: Config, events: list[tuple[str, str]]) -> None:
    """Every event applied to its user's state once, in order, in the store of ``cfg``'s worker (each user must
    have fewer events than ``model.max_len``, so that the window lists them all)."""
    want: dict[str, list[str]] = {}
    for user, item in events:
        want.setdefault(user, []).append(item)
    assert max(map(len, want.values())) < cfg.model.max_len
    got = applied_items(cfg, set(want))
    twice = {u: len(got[u]) - len(want[u]) for u in want if len(got[u]) > len(want[u])}
    assert not twice, f"events applied more than once (extra events per user): {twice}"
    assert got == want, "every event applied once, in order"


def test_sigterm_and_sigint_stop_a_worker_in_time_and_its_events_are_applied_exactly_once_by_the_next_owner(
        kafka_overrides: list[str], tmp_path: Path) -> None:
    """Each signal, mid-stream, to a worker holding every event it applied uncommitted: a clean stop (exit status
    0, no watchdog exit) within ``stream.stop_timeout_s`` + STOP_SLACK_S; then every event applied once, in order,
    by the owners that came after."""
    cfg = load_config(overrides=kafka_overrides)
    limit_s = cfg.stream.stop_timeout_s + STOP_SLACK_S
    create_topics(cfg)
    publish_model(cfg)
    events = spread_events(5000, users=50)  # 100 events per user, below model.max_len
    produce_events(cfg, events[:1000])
    signalled = threading.Event()  # then the rest goes at once
    flowing = threading.Thread(target=produce_paced, args=(cfg, events[1000:], 200.0, 1000, signalled), daemon=True)
    workers = [WorkerProcess([*kafka_overrides, f"state.dir={tmp_path / name}"], tmp_path / f"{name}.log")
               for name in ("first", "second", "last")]
    try:
        for worker, signum in zip(workers, (signal.SIGTERM, signal.SIGINT), strict=False):
            worker.start(HOLD)
            worker.wait_healthy()
            if flowing.ident is None:
                flowing.start()
            wait_served(worker, 300)  # mid-stream: serving, with events still arriving
            took = stop_with(worker, signum)
            print(f"\n{signum.name}: exited {took:.2f} s after the signal")
            assert took <= limit_s, f"{signum.name}: still running {took:.1f} s after it (limit {limit_s} s)"
            assert worker.proc is not None and worker.proc.returncode == 0, worker.tail()
            assert "without a clean stop" not in worker.tail(), worker.tail()
        signalled.set()
        flowing.join(60)
        workers[-1].start(["stream.batch_size=32"])
        workers[-1].wait_healthy()
        wait_all_sources(cfg, len(events))
    finally:
        signalled.set()
        for w in workers:
            w.stop()  # the last one's clean stop commits what it applied
    assert_applied_exactly_once(load_config(overrides=[*kafka_overrides, f"state.dir={tmp_path / 'last'}"]), events)
