"""The embedded broker: start/stop/status, idempotence, and the one-line errors users see."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lrustream.broker import BrokerError, LocalBroker, free_port, metadata_answers, new_cluster_id
from tests.conftest import JARS_DIR, REPO

CLI = [sys.executable, "-m", "lrustream.cli"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=180)


def _overrides(data_dir: Path, port: int, cport: int) -> list[str]:
    return [f"broker.data_dir={data_dir}", f"broker.jars_dir={JARS_DIR}",
            f"broker.port={port}", f"broker.controller_port={cport}"]


def test_cli_start_is_idempotent_status_reports_and_stop_ends_only_ours(tmp_path: Path) -> None:
    port, cport = free_port(), free_port()
    args = _overrides(tmp_path / "b", port, cport)
    first = _cli("broker", "start", *args)
    try:
        assert first.returncode == 0, first.stderr
        assert "started" in first.stdout
        assert metadata_answers(f"127.0.0.1:{port}")
        pid = int((tmp_path / "b" / "broker.pid").read_text().split()[0])

        second = _cli("broker", "start", *args)
        assert second.returncode == 0, second.stderr
        assert "already running" in second.stdout
        assert int((tmp_path / "b" / "broker.pid").read_text().split()[0]) == pid

        status = _cli("broker", "status", *args)
        assert status.returncode == 0 and f"pid={pid}" in status.stdout
        as_json = _cli("broker", "status", "--json", *args)
        assert as_json.returncode == 0 and json.loads(as_json.stdout) == {
            "running": True, "answering": True, "pid": pid, "bootstrap": f"127.0.0.1:{port}"}

        # A second data dir on the same port is refused with one clear line, and ours keeps running.
        clash = _cli("broker", "start", *_overrides(tmp_path / "other", port, free_port()))
        assert clash.returncode == 1
        assert clash.stderr.strip().count("\n") == 0
        assert f"port {port}" in clash.stderr and "already in use" in clash.stderr
        assert metadata_answers(f"127.0.0.1:{port}")
        # Stopping the other data dir must not stop ours.
        assert "not running" in _cli("broker", "stop", *_overrides(tmp_path / "other", port, cport)).stdout
        assert metadata_answers(f"127.0.0.1:{port}")
    finally:
        stop = _cli("broker", "stop", *args)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    down = _cli("broker", "status", *args)
    assert down.returncode == 3 and "not running" in down.stdout
    assert not metadata_answers(f"127.0.0.1:{port}", 2)


def test_restart_keeps_data_and_reuses_formatted_storage(tmp_path: Path) -> None:
    from confluent_kafka import Producer

    broker = LocalBroker(tmp_path, JARS_DIR, port=free_port(), controller_port=free_port())
    broker.start()
    try:
        p = Producer({"bootstrap.servers": broker.bootstrap})
        p.produce("kept", b"v")
        assert p.flush(30) == 0
    finally:
        broker.stop()
    meta = (broker.log_dirs / "meta.properties").read_text()
    broker.start()
    try:
        assert (broker.log_dirs / "meta.properties").read_text() == meta
        from confluent_kafka.admin import AdminClient

        assert "kept" in AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).topics
    finally:
        broker.stop()


def test_port_in_use_by_a_stranger_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = LocalBroker(tmp_path, JARS_DIR, port=port, controller_port=free_port())
        with pytest.raises(BrokerError, match=f"port {port} on 127.0.0.1 is already in use"):
            broker.start()
    assert not broker.pid_file.exists()


def test_corrupt_data_dir_is_refused(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path, JARS_DIR, port=free_port(), controller_port=free_port())
    broker.log_dirs.mkdir(parents=True)
    (broker.log_dirs / "garbage.log").write_text("not kafka")
    with pytest.raises(BrokerError, match="corrupt"):
        broker.start()
    (broker.log_dirs / "meta.properties").write_text("version=1\n")
    with pytest.raises(BrokerError, match="corrupt"):
        broker.start()


def _bare_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH holds only python: no java, no mvn."""
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "python").symlink_to(sys.executable)
    env["PATH"] = str(shim)
    return env


def test_missing_java_is_one_clear_error(tmp_path: Path) -> None:
    env = _bare_env(tmp_path)
    r = _cli("broker", "start", *_overrides(tmp_path / "b", free_port(), free_port()), env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == ("error: 'java' is not on PATH: install a Java 17+ runtime to run the local "
                                "Kafka broker")


def test_missing_maven_without_cached_jars_is_one_clear_error(tmp_path: Path) -> None:
    env = _bare_env(tmp_path)
    r = _cli("broker", "fetch", f"broker.jars_dir={tmp_path / 'nojars'}", env=env)
    assert r.returncode == 1
    assert "'mvn' (Apache Maven) is not on PATH" in r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_cached_jars_need_no_maven(tmp_path: Path) -> None:
    env = _bare_env(tmp_path)
    r = _cli("broker", "fetch", f"broker.jars_dir={JARS_DIR}", env=env)
    assert r.returncode == 0, r.stderr


def test_cluster_id_never_starts_with_a_dash() -> None:
    """0xF8 encodes to a leading '-', which kafka-storage would read as an option (CI failure, stop 8)."""
    draws = iter([b"\xf8" + bytes(15), b"\x00" * 16])
    cluster_id = new_cluster_id(lambda: next(draws))
    assert cluster_id == "AAAAAAAAAAAAAAAAAAAAAA"
    assert all(not new_cluster_id().startswith("-") for _ in range(2000))


def _free_run(length: int) -> int:
    """The first of ``length`` consecutive free ports (a cluster's nodes take consecutive port pairs)."""
    from lrustream.broker import port_in_use

    for _ in range(200):
        base = free_port()
        if base + length < 65535 and not any(port_in_use("127.0.0.1", base + i) for i in range(length)):
            return base
    raise AssertionError(f"no {length} consecutive free ports")


def test_cli_runs_a_three_node_cluster_that_outlives_a_node_and_replicates_every_topic(tmp_path: Path) -> None:
    port = _free_run(6)
    args = [f"broker.data_dir={tmp_path / 'c'}", f"broker.jars_dir={JARS_DIR}", f"broker.port={port}",
            "broker.nodes=3", f"topics.interactions=t{port}-in"]
    bootstrap = ",".join(f"127.0.0.1:{port + 2 * i}" for i in range(3))
    started = _cli("broker", "start", *args)
    try:
        assert started.returncode == 0, started.stderr
        assert [line.split(":")[0] for line in started.stdout.splitlines()[:3]] == ["node 1", "node 2", "node 3"]
        assert f"bootstrap: {bootstrap}" in started.stdout
        created = _cli("topics", "create", *args)
        assert created.returncode == 0 and f"t{port}-in: created" in created.stdout, created.stderr
        from confluent_kafka.admin import AdminClient, ConfigResource

        client = AdminClient({"bootstrap.servers": bootstrap})
        partitions = client.list_topics(f"t{port}-in", timeout=10).topics[f"t{port}-in"].partitions.values()
        assert {len(p.replicas) for p in partitions} == {3}
        described = client.describe_configs([ConfigResource("topic", f"t{port}-in")])
        assert next(iter(described.values())).result()["min.insync.replicas"].value == "2"

        stopped = _cli("broker", "stop", "--node", "2", *args)
        assert stopped.returncode == 0 and stopped.stdout.strip() == "node 2: stopped"
        status = _cli("broker", "status", "--json", *args)
        document = json.loads(status.stdout)
        assert status.returncode == 3 and [n["running"] for n in document["nodes"]] == [True, False, True]
        assert metadata_answers(f"127.0.0.1:{port}")  # two of three nodes serve on
        again = _cli("topics", "create", *args)
        assert again.returncode == 0 and "under-replicated" in again.stdout, again.stdout
        logs = _cli("broker", "logs", "--node", "2", "-n", "5", *args)
        lines = logs.stdout.splitlines()
        assert logs.returncode == 0 and lines[0].startswith("==> node 2: ") and 1 < len(lines) <= 6, logs.stdout
        restarted = _cli("broker", "start", "--node", "2", *args)
        assert restarted.returncode == 0 and "node 2: started" in restarted.stdout, restarted.stderr
        assert _cli("broker", "status", *args).returncode == 0
    finally:
        stop = _cli("broker", "stop", *args)
    assert stop.returncode == 0 and stop.stdout.splitlines() == ["node 3: stopped", "node 2: stopped",
                                                                  "node 1: stopped"]
