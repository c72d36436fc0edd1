"""Topic layout: every topic lrustream reads or writes, created idempotently with the right settings."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException, TopicCollection
from confluent_kafka.admin import NewTopic

from lrustream.kernel.config import Config
from lrustream.kernel.kafka import admin


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def topic_specs(cfg: Config) -> list[TopicSpec]:
    """Input, output and changelog share the partition count: user u lives on the same partition in each."""
    t = cfg.topics
    n = t.partitions
    compacted = {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"}
    return [
        TopicSpec(t.interactions, n, {}),
        TopicSpec(t.recommendations, n, {}),
        TopicSpec(t.dlq, 1, {}),
        TopicSpec(t.training_examples, n, {}),
        TopicSpec(t.model_updates, 1, {}),
        TopicSpec(t.state_changelog, n, compacted),
        TopicSpec(t.items, 1, compacted),
        TopicSpec(t.model_versions, 1, compacted),
    ]


def create_topics(cfg: Config, timeout_s: float = 30.0) -> dict[str, str]:
    """Create missing topics; returns name -> 'created' | 'exists'. Raises on any other failure."""
    client = admin(cfg)
    existing = set(client.list_topics(timeout=timeout_s).topics)
    result = {}
    wanted = []
    for spec in topic_specs(cfg):
        if spec.name in existing:
            result[spec.name] = "exists"
        else:
            wanted.append(NewTopic(spec.name, spec.partitions, cfg.topics.replication_factor, config=spec.config))
    if wanted:
        for name, future in client.create_topics(wanted, operation_timeout=timeout_s).items():
            try:
                future.result()
                result[name] = "created"
            except KafkaException as exc:
                if exc.args and exc.args[0].name() == "TOPIC_ALREADY_EXISTS":
                    result[name] = "exists"
                else:
                    raise
    return result


def partition_counts(cfg: Config, timeout_s: float = 10.0) -> dict[str, int]:
    client = admin(cfg)
    md = client.list_topics(timeout=timeout_s)
    return {name: len(t.partitions) for name, t in md.topics.items() if not name.startswith("__")}


def topic_id(cfg: Config, name: str, timeout_s: float = 10.0) -> bytes | None:
    """Kafka's id of topic ``name`` (16 bytes; a re-created topic gets a new one), None when it cannot be read."""
    client = admin(cfg)
    try:
        described = client.describe_topics(TopicCollection([name]), request_timeout=timeout_s)[name].result()
    except KafkaException:
        return None
    uid = described.topic_id
    return ((uid.get_most_significant_bits() & (2**64 - 1)).to_bytes(8, "big")
            + (uid.get_least_significant_bits() & (2**64 - 1)).to_bytes(8, "big"))
