"""Security on a real broker: a worker authenticates with SASL/PLAIN through both clients (librdkafka and
Faust), and refuses an open HTTP API unless told (the client settings themselves:
tests/unit/lrustream/kernel/test_kafka_security.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaException

from lrustream.broker import LocalBroker, free_port
from lrustream.kernel.config import load_config
from stream.topics import create_topics
from tests.conftest import JARS_DIR
from tests.streamkit import WorkerProcess, event_value, produce, publish_model, recommendations


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second local broker whose client listener wants SASL/PLAIN (user ``svc``): its bootstrap address."""
    if not JARS_DIR.is_dir() and not os.environ.get("CI"):
        pytest.skip("the broker jars are not resolved (`make jars`)")
    port = free_port()
    broker = LocalBroker(tmp_path_factory.mktemp("sasl-kafka"), JARS_DIR, port=free_port(),
                         controller_port=free_port(), sasl_port=port, sasl_users={"svc": "hunter2"})
    broker.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        broker.stop()


@pytest.mark.kafka
def test_a_worker_authenticates_with_sasl_through_both_clients(sasl_broker: str, tmp_path: Path) -> None:
    """The one resolved mechanism reaches librdkafka (topics, producers, the changelog) and Faust (the consumer
    group) alike: a worker on a SASL_PLAINTEXT listener serves an event, and a wrong password is refused."""
    overrides = [f"kafka.bootstrap_servers={sasl_broker}", "kafka.security.protocol=SASL_PLAINTEXT",
                 "kafka.security.sasl_mechanism=PLAIN", "kafka.security.sasl_username=svc",
                 f"state.dir={tmp_path / 'state'}", f"model_store.dir={tmp_path / 'models'}", "topics.partitions=1"]
    cfg = load_config(overrides=[*overrides, "kafka.security.sasl_password=wrong"])
    with pytest.raises(KafkaException):  # librdkafka reports the closed connection, not the reason
        create_topics(cfg)
    overrides.append("kafka.security.sasl_password=hunter2")
    cfg = load_config(overrides=overrides)
    create_topics(cfg)
    publish_model(cfg)
    produce(cfg, [(b"u1", event_value("u1", "i3", 1)), (b"u1", event_value("u1", "i4", 2))])
    worker = WorkerProcess(overrides, tmp_path / "worker.log").start()
    try:
        recs = recommendations(cfg, expect=2, timeout_s=120)
    finally:
        worker.stop()
    assert [r["source"]["offset"] for r in recs] == [0, 1], worker.tail()


@pytest.mark.kafka
def test_a_worker_refuses_an_open_http_api_unless_told_and_then_warns(kafka_overrides: list[str],
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    """``lrustream worker`` with its API on every interface and no token stops before it opens anything, with one
    line naming the opt-in; with ``http.allow_open=true`` it serves, and says so in its log."""
    monkeypatch.delenv("LRUSTREAM_HTTP_TOKEN", raising=False)
    cfg = load_config(overrides=kafka_overrides)
    create_topics(cfg)
    publish_model(cfg)
    refused = WorkerProcess([*kafka_overrides, "http.host=0.0.0.0"], tmp_path / "refused.log").start()
    assert refused.proc is not None and refused.proc.wait(60) == 2
    assert "without http.token" in refused.tail() and "http.allow_open=true" in refused.tail()
    produce(cfg, [(b"u1", event_value("u1", "i3", 1))])
    opened = WorkerProcess([*kafka_overrides, "http.host=0.0.0.0", "http.allow_open=true"], tmp_path / "open.log")
    try:
        opened.start()
        recs = recommendations(cfg, expect=1, timeout_s=120)
    finally:
        opened.stop()
    assert len(recs) == 1 and "LRUSTREAM_HTTP_TOKEN" in opened.tail(200)
