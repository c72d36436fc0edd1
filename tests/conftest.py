"""Shared fixtures. The Kafka fixture is the contract every integration test relies on:

1. ``LRUSTREAM_KAFKA_BOOTSTRAP`` when set (an existing cluster);
2. else testcontainers' Kafka module when a Docker engine answers (users' machines);
3. else the project's own local broker (real Apache Kafka from Maven Central) on a free port.

When ``CI`` is set and none of these yields a broker, tests that need Kafka FAIL; they never skip.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrustream.broker import BrokerError, LocalBroker, free_port, metadata_answers
from lrustream.kernel.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
JARS_DIR = REPO / ".lrustream" / "kafka-jars"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run the slow reliability tier")


INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests under tests/integration/ are the ``kafka`` tests (a real broker); a test elsewhere that asks for the
    broker is a mistake, refused here. The slow tier runs with --run-slow."""
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.kafka)
        elif "kafka_bootstrap" in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(f"{item.nodeid} uses the Kafka broker: it belongs under tests/integration/")
    if config.getoption("--run-slow"):
        return
    deselected = [it for it in items if "slow" in it.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [it for it in items if "slow" not in it.keywords]


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        return bool(client.ping())
    except Exception:
        return False


def _no_kafka(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"Kafka is required in CI and none could be started: {reason}")
    pytest.skip(f"no Kafka broker: {reason}")


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = os.environ.get("LRUSTREAM_KAFKA_BOOTSTRAP")
    if env:
        if not metadata_answers(env, 10):
            _no_kafka(f"LRUSTREAM_KAFKA_BOOTSTRAP={env} does not answer")
        yield env
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    port, cport = free_port(), free_port()
    broker = LocalBroker(tmp_path_factory.mktemp("kafka"), JARS_DIR, port=port, controller_port=cport)
    try:
        broker.start()
    except BrokerError as exc:
        _no_kafka(str(exc))
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def unique() -> str:
    """A short id to keep each test's topics and groups apart on the shared broker."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def kafka_overrides(kafka_bootstrap: str, unique: str, tmp_path: Path) -> list[str]:
    """Overrides pointing at the test broker, with topics, state and model store private to this test
    (a list, so subprocesses such as ``lrustream worker`` get exactly the same configuration)."""
    t = f"t{unique}"
    return [
        f"kafka.bootstrap_servers={kafka_bootstrap}",
        f"topics.interactions={t}-interactions",
        f"topics.recommendations={t}-recommendations",
        f"topics.dlq={t}-interactions.dlq",
        f"topics.training_examples={t}-training-examples",
        f"topics.model_updates={t}-model-updates",
        f"topics.state_changelog={t}-state-changelog",
        f"topics.items={t}-items",
        f"topics.model_versions={t}-model-versions",
        f"stream.app_id={t}-worker",
        f"online.group_id={t}-trainer",
        f"state.dir={tmp_path / 'state'}",
        f"model_store.dir={tmp_path / 'models'}",
        "topics.partitions=2",
    ]


@pytest.fixture
def kafka_cfg(kafka_overrides: list[str]) -> Config:
    """A config pointing at the test broker, with topics, state and model store private to this test."""
    return load_config(overrides=kafka_overrides)


KCAT_DIR = REPO / ".lrustream" / "kcat"  # where `make kcat` unpacks Debian's packages


def find_kcat() -> tuple[str, dict[str, str]] | None:
    """kcat on PATH, else the one `make kcat` unpacked (with its libraries), with the environment to run it."""
    on_path = shutil.which("kcat") or shutil.which("kafkacat")
    if on_path:
        return on_path, dict(os.environ)
    local = KCAT_DIR / "usr" / "bin" / "kcat"
    if not local.is_file():
        return None
    libs = [str(p.parent) for p in KCAT_DIR.glob("usr/lib/*/librdkafka.so.1")]
    libs.append(os.environ.get("LD_LIBRARY_PATH", ""))
    return str(local), {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(libs)}


@pytest.fixture(scope="session")
def kcat() -> tuple[str, dict[str, str]]:
    """(path, environment) of Debian's kcat, a Kafka client nobody here wrote. Missing: a skip on a
    developer's machine, a failure in CI (`make test` installs it first)."""
    found = find_kcat()
    if found is None:
        missing = "kcat is not installed: run `make kcat` (Debian's packages) or `apt-get install kcat`"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{missing}; CI must run this test, not skip it")
        pytest.skip(missing)
    return found


PROMETHEUS_PKG_DIR = REPO / ".lrustream" / "prometheus"  # where `make prometheus` unpacks Debian's package


def prometheus_tool(name: str) -> str:
    """``promtool`` or ``prometheus`` from Debian's ``prometheus`` package: the one on PATH, else the one
    `make prometheus` unpacked. Missing: a skip on a developer's machine, a failure when CI is set (`make test`
    installs it first)."""
    found = shutil.which(name)
    local = PROMETHEUS_PKG_DIR / "usr" / "bin" / name
    if found:
        return found
    if local.is_file():
        return str(local)
    missing = f"{name} is not installed: run `make prometheus` or `apt-get install prometheus`"
    if os.environ.get("CI"):
        pytest.fail(f"{missing}; CI must run this test, not skip it")
    pytest.skip(missing)


@pytest.fixture(scope="session")
def promtool() -> str:
    return prometheus_tool("promtool")
