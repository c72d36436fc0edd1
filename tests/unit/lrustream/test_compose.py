"""docker-compose.yml keeps its promises without a Docker engine: the file is parsed and checked against the
Kafka listener settings it declares, the Dockerfile it builds, and lrustream's own configuration schema; workers
and trainer share nothing but the broker, so `docker compose up --scale worker=3` gives three workers,
each with its own states and model cache."""

from __future__ import annotations

import re
import shlex
from pathlib import PurePosixPath
from typing import Any

import pytest
import yaml

from lrustream.kernel.config import DEFAULT_CONFIG, ConfigError, load_config
from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
APPS = ("worker", "trainer")
NON_CONFIG_ENV: set[str] = set()  # environment variables set for reasons other than configs/default.yaml


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment whether written as a mapping or as a list of NAME=value."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command_of(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    assert cmd, "service has no command"
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def ports_of(service: dict[str, Any]) -> list[tuple[str | None, int, int]]:
    """(host_ip, published, target) for each port, short ("127.0.0.1:9092:29092") or long syntax; a published
    range ("6066-6075") gives its first port (:func:`port_ranges` has the whole)."""
    out = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out.append((p.get("host_ip"), int(p["published"]), int(p["target"])))
            continue
        parts = str(p).split("/")[0].split(":")
        if len(parts) == 3:
            out.append((parts[0], int(parts[1].split("-")[0]), int(parts[2])))
        elif len(parts) == 2:
            out.append((None, int(parts[0].split("-")[0]), int(parts[1])))
        else:
            out.append((None, int(parts[0]), int(parts[0])))
    return out


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """'NAME://host:port,...' -> {NAME: (host, port)}; an empty host means all interfaces."""
    out = {}
    for item in value.split(","):
        m = re.fullmatch(r"\s*([A-Za-z0-9_]+)://(.*):(\d+)\s*", item)
        assert m, f"listener {item!r} is not NAME://host:port"
        out[m.group(1)] = (m.group(2), int(m.group(3)))
    return out


def port_ranges(service: dict[str, Any]) -> list[tuple[int, int]]:
    """(first, last) published host port of each short-syntax port ("127.0.0.1:6066-6075:6066")."""
    out = []
    for p in service.get("ports") or []:
        published = str(p).split("/")[0].split(":")[-2]
        first, _, last = published.partition("-")
        out.append((int(first), int(last or first)))
    return out


def mounts_of(service: dict[str, Any]) -> dict[str, str]:
    """container path -> volume source ("" for an anonymous volume), short ("models:/app/...", "/app/...") or
    long syntax."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out[v["target"]] = v.get("source", "")
        else:
            parts = str(v).split(":")
            source, target = ("", parts[0]) if len(parts) == 1 else parts[:2]
            out[target] = source
    return out


def workdir() -> PurePosixPath:
    dirs = re.findall(r"^\s*WORKDIR\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert dirs, "Dockerfile sets no WORKDIR"
    return PurePosixPath(dirs[-1])


def kafka_env(services: dict[str, Any]) -> dict[str, str]:
    return env_of(services["kafka"])


def test_compose_defines_kafka_worker_and_trainer(services: dict[str, Any]) -> None:
    assert {"kafka", "worker", "trainer"} <= set(services)


def test_kafka_is_the_official_apache_image_version_4(services: dict[str, Any]) -> None:
    image = services["kafka"]["image"]
    name, _, tag = image.partition(":")
    assert name == "apache/kafka"
    assert re.fullmatch(r"4\.\d+\.\d+", tag), f"expected a 4.x.y tag, got {image!r}"


def test_kafka_runs_kraft_combined_broker_and_controller(services: dict[str, Any]) -> None:
    env = kafka_env(services)
    roles = {r.strip() for r in env["KAFKA_PROCESS_ROLES"].split(",")}
    assert roles == {"broker", "controller"}
    declared = listeners(env["KAFKA_LISTENERS"])
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in declared
    # The single voter is this node, reached on the controller listener's port.
    voter = re.fullmatch(r"(\d+)@([\w.-]+):(\d+)", env["KAFKA_CONTROLLER_QUORUM_VOTERS"])
    assert voter, env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert voter.group(1) == str(env["KAFKA_NODE_ID"])
    assert voter.group(2) == "kafka"
    assert int(voter.group(3)) == declared[controller][1]
    # Internal topics cannot have more replicas than there are brokers.
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert env[key] == "1", key


def test_every_kafka_listener_has_a_security_protocol(services: dict[str, Any]) -> None:
    env = kafka_env(services)
    mapped = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners(env["KAFKA_LISTENERS"])) <= set(mapped)
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    assert set(advertised) <= set(listeners(env["KAFKA_LISTENERS"]))
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] not in advertised


def test_kafka_publishes_9092_on_host_loopback_to_a_listener_advertised_as_such(services: dict[str, Any]) -> None:
    env = kafka_env(services)
    declared = listeners(env["KAFKA_LISTENERS"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    published = [(ip, target) for ip, host_port, target in ports_of(services["kafka"]) if host_port == 9092]
    assert published, "port 9092 is not published on the host"
    for ip, target in published:
        assert ip == "127.0.0.1", f"9092 published on {ip or 'all interfaces'}"
        # The container port is a listener whose advertised address is the host's 127.0.0.1:9092, so clients on
        # the host are sent back to an address they can reach.
        names = [name for name, (_, port) in declared.items() if port == target]
        assert names, f"container port {target} is no listener in KAFKA_LISTENERS"
        assert any(advertised.get(n) in {("127.0.0.1", 9092), ("localhost", 9092)} for n in names), names


@pytest.mark.parametrize("app", APPS)
def test_app_bootstrap_is_the_kafka_services_in_network_listener(services: dict[str, Any], app: str) -> None:
    env = kafka_env(services)
    bootstrap = env_of(services[app])["LRUSTREAM_KAFKA_BOOTSTRAP"]
    host, _, port = bootstrap.rpartition(":")
    assert host == "kafka" and host in services
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    declared = listeners(env["KAFKA_LISTENERS"])
    names = [name for name, addr in advertised.items() if addr == (host, int(port))]
    assert names, f"{bootstrap} is not an advertised listener"
    assert all(declared[n][1] == int(port) for n in names), "advertised port differs from the listening port"


def test_worker_http_port_is_published_only_on_host_loopback(services: dict[str, Any]) -> None:
    ports = ports_of(services["worker"])
    http = [(ip, target) for ip, host_port, target in ports if host_port == 6066]
    assert http, "worker does not publish 6066"
    cfg = load_config(overrides=[o for o in command_of(services["worker"]) if "=" in o and not o.startswith("-")])
    for ip, target in http:
        assert ip == "127.0.0.1"
        assert target == cfg.http.port
    assert cfg.http.host == "0.0.0.0", "inside a container the worker must listen on all interfaces"
    assert all(ip == "127.0.0.1" for ip, _, _ in ports)


def test_no_named_volume_is_mounted_by_two_services(compose: dict[str, Any], services: dict[str, Any]) -> None:
    users: dict[str, list[str]] = {}
    for name, service in services.items():
        for source in mounts_of(service).values():
            if source in (compose.get("volumes") or {}):
                users.setdefault(source, []).append(name)
    assert {volume: who for volume, who in users.items() if len(who) > 1} == {}


def test_each_worker_replica_keeps_its_states_and_model_cache_in_volumes_of_its_own(services: dict[str, Any]
                                                                                    ) -> None:
    """Anonymous volumes: each replica gets its own; a named one would be one folder for every replica."""
    cfg = load_config()
    mounts = mounts_of(services["worker"])
    for path in (str(workdir() / cfg.state.dir), str(workdir() / cfg.model_store.dir)):
        assert path in mounts, f"the worker mounts nothing at {path}"
        assert mounts[path] == "", f"the worker mounts {mounts[path]!r} at {path}: shared by every replica"


def test_the_trainer_keeps_its_model_cache_in_a_volume_no_worker_mounts(services: dict[str, Any]) -> None:
    models_path = str(workdir() / load_config().model_store.dir)
    source = mounts_of(services["trainer"]).get(models_path)
    assert source is not None, "the trainer's model cache (and rounds.jsonl) would be lost with its container"
    assert source == "" or source not in mounts_of(services["worker"]).values()


def test_worker_replicas_do_not_collide_on_a_host_port(services: dict[str, Any]) -> None:
    ranges = port_ranges(services["worker"])
    assert ranges and all(last - first >= 2 for first, last in ranges), f"room for fewer than 3 replicas: {ranges}"


def test_kafka_data_lives_on_a_named_volume(compose: dict[str, Any], services: dict[str, Any]) -> None:
    log_dirs = kafka_env(services)["KAFKA_LOG_DIRS"]
    assert mounts_of(services["kafka"]).get(log_dirs) in (compose.get("volumes") or {})


def test_kafka_healthcheck_asks_the_broker_itself(services: dict[str, Any]) -> None:
    test = services["kafka"]["healthcheck"]["test"]
    text = test if isinstance(test, str) else " ".join(test)
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in text
    port = int(re.search(r"--bootstrap-server\s+[\w.-]+:(\d+)", text).group(1))  # type: ignore[union-attr]
    assert port in {p for _, p in listeners(kafka_env(services)["KAFKA_LISTENERS"]).values()}


@pytest.mark.parametrize("app", APPS)
def test_app_waits_for_a_healthy_kafka(services: dict[str, Any], app: str) -> None:
    assert services[app]["depends_on"]["kafka"]["condition"] == "service_healthy"


@pytest.mark.parametrize("app", APPS)
def test_app_is_built_from_the_repo_dockerfile(services: dict[str, Any], app: str) -> None:
    build = services[app]["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (REPO / context / dockerfile).resolve() == DOCKERFILE
    assert DOCKERFILE.is_file()


@pytest.mark.parametrize("app", APPS)
def test_app_command_is_the_lrustream_subcommand_with_real_config_keys(services: dict[str, Any], app: str) -> None:
    cmd = command_of(services[app])
    assert cmd[:2] == ["lrustream", app]
    overrides = [arg for arg in cmd[2:] if "=" in arg and not arg.startswith("-")]
    load_config(overrides=overrides)  # raises ConfigError for an unknown key or a wrong type


def test_config_refuses_an_unknown_override_key() -> None:
    # The check above is only worth something if a wrong key really fails.
    with pytest.raises(ConfigError):
        load_config(overrides=["http.hots=0.0.0.0"])


@pytest.mark.parametrize("app", APPS)
def test_app_environment_names_are_read_by_the_default_config(services: dict[str, Any], app: str) -> None:
    text = DEFAULT_CONFIG.read_text()
    names = set(env_of(services[app])) - NON_CONFIG_ENV
    assert names, f"{app} sets no environment"
    unread = sorted(n for n in names if f"oc.env:{n}," not in text and f"oc.env:{n}}}" not in text)
    assert not unread, f"configs/default.yaml reads none of {unread}"


def test_worker_http_token_comes_from_the_host_environment(services: dict[str, Any]) -> None:
    assert env_of(services["worker"])["LRUSTREAM_HTTP_TOKEN"] == "${LRUSTREAM_HTTP_TOKEN:-}"
