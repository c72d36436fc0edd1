"""A three-node cluster (replication factor 3, ``min.insync.replicas`` 2) losing brokers mid-stream, against the
real worker, the online trainer and a paced replay. Each fault kind runs the same events through a worker of its
own and must end as a clean run on the same cluster ends: one recommendation or more for every event, the state of
every user byte for byte equal, nothing dead-lettered; then the trainer publishes a version that the worker serves.

The faults (as Kafka's own system tests bounce brokers): SIGKILL the leader of an input partition; SIGKILL the
transaction coordinator of the worker's changelog writers while the worker commits; SIGKILL the active
controller; a rolling restart, one node at a time; two nodes down at once, when writes must wait and the worker
says it is degraded, then back. The cluster is whole again (every replica in sync) before the next fault."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lrustream.bench.failover import leader_of, wait_in_sync
from lrustream.broker import LocalCluster
from lrustream.kernel.config import Config, load_config
from stream.pipeline import HOLD_COMMIT_ENV
from stream.topics import create_topics
from tests.conftest import JARS_DIR
from tests.streamkit import (
    WorkerProcess,
    produce_events,
    produce_paced,
    publish_model,
    read_topic,
    recommendations,
    stored_states,
    synthetic_events,
    wait_for_version,
)
from trainer.online import TrainerLoop

pytestmark = pytest.mark.slow

EVENTS = synthetic_events(2400, users=60, seed=11)
UP_FRONT = 800  # produced before the worker starts; the rest flows at RATE across the fault
RATE = 200.0
DOWN_S = 6.0  # how long a killed node stays down


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    nodes = LocalCluster.on_free_ports(tmp_path_factory.mktemp("cluster"), JARS_DIR, nodes=3)
    nodes.start()
    try:
        yield nodes
    finally:
        nodes.stop()


def overrides_for(cluster: LocalCluster, name: str, tmp_path: Path) -> list[str]:
    """Topics, group, state and model store of one run, on the cluster."""
    t = f"c{name}"
    return [
        f"kafka.bootstrap_servers={cluster.bootstrap}",
        *(f"topics.{key}={t}-{key}" for key in ("interactions", "recommendations", "dlq", "training_examples",
                                                "model_updates", "state_changelog", "items", "model_versions")),
        f"stream.app_id={t}-worker", f"online.group_id={t}-trainer",
        f"state.dir={tmp_path / name / 'state'}", f"model_store.dir={tmp_path / name / 'models'}",
        "topics.partitions=2", "stream.batch_size=32", "stream.stall_after_s=2",
        # a round of 5 steps at a learning rate too small to move a ranking: the gate publishes it, and what is
        # checked is that the announcement reaches the worker after the fault
        "online.min_holdout=1", "online.tolerance=1.0", "online.min_steps=5", "online.max_steps=5",
        "online.lr=1e-9", "online.every_seconds=1000000", "online.every_events=1000000000", "online.http_port=0",
    ]


def wait_whole(cluster: LocalCluster, cfg: Config) -> None:
    """Every node answers and every partition of the cluster has all its replicas in sync."""
    cluster.start()
    wait_in_sync(cfg)


def bounce(cluster: LocalCluster, node: int, while_down: Callable[[], None] = lambda: None) -> None:
    """SIGKILL ``node``, keep it down a while (``while_down`` runs meanwhile), start it again."""
    assert cluster.kill(node), f"node {node} was not running"
    while_down()
    time.sleep(DOWN_S)
    cluster.start(node)


def kill_input_leader(cluster: LocalCluster, cfg: Config, worker: WorkerProcess) -> str:
    node = leader_of(cfg, cfg.topics.interactions)
    bounce(cluster, node)
    return f"node {node}, leader of {cfg.topics.interactions}-0"


def kill_transaction_coordinator(cluster: LocalCluster, cfg: Config, worker: WorkerProcess) -> str:
    """The transaction state log has one partition: its leader coordinates every changelog writer's
    transactions. The worker is held at its commit step (the pipeline's test fault-injection point) with a
    micro-batch applied, the coordinator is killed, and the commit is let go while it is down: the changelog
    transactions begin and commit against a coordinator that has to move."""
    hold = worker.hold_commit
    hold.touch()
    waiting = "the commit waits while"
    deadline = time.monotonic() + 30
    while waiting not in worker.tail(200) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert waiting in worker.tail(200), "the worker never reached its commit step"
    node = leader_of(cfg, "__transaction_state")
    bounce(cluster, node, while_down=lambda: hold.unlink())
    return f"node {node}, transaction coordinator, with a commit let go after it died"


def kill_controller(cluster: LocalCluster, cfg: Config, worker: WorkerProcess) -> str:
    node = cluster.active_controller()
    assert node is not None, "no active controller known"
    bounce(cluster, node)
    return f"node {node}, active controller"


def rolling_restart(cluster: LocalCluster, cfg: Config, worker: WorkerProcess) -> str:
    for node in (1, 2, 3):
        cluster.stop(node)
        cluster.start(node)
        wait_whole(cluster, cfg)
    return "nodes 1, 2, 3 restarted one at a time"


def two_down(cluster: LocalCluster, cfg: Config, worker: WorkerProcess) -> str:
    """Two of three nodes down: no partition has two replicas in sync and the controllers have no quorum, so
    writes wait. The worker must say it is degraded and lose nothing."""
    survivor = leader_of(cfg, cfg.topics.interactions)
    down = [n for n in (1, 2, 3) if n != survivor]
    for node in down:
        cluster.kill(node)
    said = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(h.get("status") == "degraded" for h in said):
        said.append(worker.health())
        time.sleep(0.5)
    assert any(h.get("status") == "degraded" for h in said), f"/health never said degraded: {said[-3:]}"
    for node in down:
        cluster.start(node)
    return f"nodes {down[0]} and {down[1]} down together; /health said {said[-1].get('reason')!r}"


Fault = Callable[[LocalCluster, Config, WorkerProcess], str]
FAULTS: dict[str, Fault] = {
    "input-leader": kill_input_leader,
    "transaction-coordinator": kill_transaction_coordinator,
    "controller": kill_controller,
    "rolling-restart": rolling_restart,
    "two-brokers-down": two_down,
}


def run(cluster: LocalCluster, name: str, tmp_path: Path, fault: Fault | None) -> tuple[Config, str, str]:
    """The events through a fresh worker (and the trainer afterwards), ``fault`` injected mid-stream; returns
    the run's config, what the fault did, and the version the trainer published after it."""
    overrides = overrides_for(cluster, name, tmp_path)
    cfg = load_config(overrides=overrides)
    wait_whole(cluster, cfg)
    create_topics(cfg)
    publish_model(cfg)
    produce_events(cfg, EVENTS[:UP_FRONT])
    worker = WorkerProcess(overrides, tmp_path / f"{name}.log")
    worker.hold_commit = tmp_path / f"{name}.hold"  # absent: the fault-injection point is idle
    os.environ[HOLD_COMMIT_ENV] = str(worker.hold_commit)
    try:
        worker.start()
    finally:
        del os.environ[HOLD_COMMIT_ENV]
    trainer: TrainerLoop | None = None
    try:
        worker.wait_healthy()
        flowing = threading.Thread(target=produce_paced, args=(cfg, EVENTS[UP_FRONT:], RATE, UP_FRONT),
                                   daemon=True)
        flowing.start()
        time.sleep(1.5)
        served = worker.get_metric("lrustream_recommendations_total")
        assert 0 < served < len(EVENTS), f"the fault comes mid-stream ({served:.0f} served)"
        did = fault(cluster, cfg, worker) if fault else "no fault"
        flowing.join(timeout=180)
        assert not flowing.is_alive(), "the producer delivered every event after the fault"
        recs = recommendations(cfg, expect=len(EVENTS), timeout_s=240)
        served = {(r["source"]["partition"], r["source"]["offset"]) for r in recs}
        assert len(served) == len(EVENTS), f"{len(EVENTS) - len(served)} events without a recommendation ({did})"
        assert worker.proc is not None and worker.proc.poll() is None, f"the worker lived through it ({did})"
        trainer = TrainerLoop(cfg, log_line=print)
        deadline = time.monotonic() + 120
        while trainer.buffer.seen < len(EVENTS) and time.monotonic() < deadline:
            trainer.poll()
        result = trainer.round()
        assert result.published, result.line()
        wait_for_version(worker, result.published, timeout_s=60)
        did += (f"; the worker retried {worker.get_metric('lrustream_batch_retries_total'):.0f} micro-batches, "
                f"{worker.get_metric('lrustream_fenced_batches_total'):.0f} fenced")
    finally:
        if trainer is not None:
            trainer.close()
        worker.stop()
    dead = read_topic(cfg, cfg.topics.dlq, timeout_s=5, idle_s=2)
    assert not dead, f"{len(dead)} good events dead-lettered ({did})"
    return cfg, did, result.published


@pytest.fixture(scope="module")
def clean_states(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, int]]:
    cfg, _, _ = run(cluster, "clean", tmp_path_factory.mktemp("clean"), None)
    return {user: state for user, (state, _) in stored_states(cfg, {u for u, _ in EVENTS}).items()}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", list(FAULTS))
def test_a_broker_fault_loses_nothing_and_applies_nothing_twice(cluster: LocalCluster, clean_states: dict,
                                                                tmp_path: Path, kind: str) -> None:
    t0 = time.monotonic()
    cfg, did, version = run(cluster, kind.replace("-", ""), tmp_path, FAULTS[kind])
    states = {user: state for user, (state, _) in stored_states(cfg, set(clean_states)).items()}
    differing = sorted(u for u in clean_states if states[u] != clean_states[u])
    print(f"\n{kind}: {did}; version {version} served after it; {time.monotonic() - t0:.0f} s")
    assert not differing, f"{len(differing)} users' states differ from the clean run's ({did}): {differing[:5]}"
