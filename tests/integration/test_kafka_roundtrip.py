"""A produce/consume round trip through confluent-kafka against the real broker the fixture provides."""

from __future__ import annotations

import json
import subprocess
import time

from confluent_kafka import Consumer, Producer

from lrustream.kernel.config import Config
from lrustream.kernel.kafka import librdkafka_config, producer_config
from stream.topics import create_topics, partition_counts, topic_specs


def _consume(cfg: Config, topic: str, n: int, timeout_s: float = 30.0) -> list:
    consumer = Consumer(librdkafka_config(cfg, **{"group.id": f"rt-{topic}", "auto.offset.reset": "earliest"}))
    consumer.subscribe([topic])
    out = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                out.append(msg)
    finally:
        consumer.close()
    return out


def test_topics_are_created_idempotently_with_configured_partitions(kafka_cfg: Config) -> None:
    first = create_topics(kafka_cfg)
    assert set(first.values()) == {"created"}
    assert set(create_topics(kafka_cfg).values()) == {"exists"}
    counts = partition_counts(kafka_cfg)
    for spec in topic_specs(kafka_cfg):
        assert counts[spec.name] == spec.partitions


def test_produce_consume_round_trip_keeps_keys_values_and_per_key_order(kafka_cfg: Config) -> None:
    create_topics(kafka_cfg)
    topic = kafka_cfg.topics.interactions
    producer = Producer(producer_config(kafka_cfg))
    sent = []
    for i in range(200):
        user = f"u{i % 7}"
        value = json.dumps({"user_id": user, "item_id": str(i), "ts": 1_700_000_000_000 + i}).encode()
        producer.produce(topic, key=user.encode(), value=value)
        sent.append((user, value))
    assert producer.flush(30) == 0
    got = _consume(kafka_cfg, topic, len(sent))
    assert len(got) == len(sent)
    by_key: dict[str, list[bytes]] = {}
    partition_of: dict[str, set[int]] = {}
    for msg in got:
        by_key.setdefault(msg.key().decode(), []).append(msg.value())
        partition_of.setdefault(msg.key().decode(), set()).add(msg.partition())
    for user in by_key:
        assert by_key[user] == [v for u, v in sent if u == user]  # per-key order kept
        assert len(partition_of[user]) == 1  # one key, one partition


def test_kcat_can_produce_and_consume(kafka_cfg: Config, kcat: tuple[str, dict[str, str]]) -> None:
    """A client nobody here wrote talks to the broker (Debian's kcat: `make kcat`, or `apt-get install kcat`)."""
    path, env = kcat
    topic = f"{kafka_cfg.topics.interactions}-kcat"
    bootstrap = kafka_cfg.kafka.bootstrap_servers
    subprocess.run([path, "-b", bootstrap, "-t", topic, "-K:", "-P"], input="u1:hello\nu2:world\n",
                   text=True, check=True, timeout=60, env=env)
    out = subprocess.run([path, "-b", bootstrap, "-t", topic, "-C", "-e", "-o", "beginning",
                          "-f", "%k=%s\n"], capture_output=True, text=True, check=True, timeout=60, env=env)
    assert sorted(out.stdout.split()) == ["u1=hello", "u2=world"]
