"""Topic layout: every topic lrustream reads or writes, created idempotently with the right settings.

Replication follows the cluster: with ``topics.replication_factor`` 0 each topic gets as many replicas as the
cluster has brokers, at most 3, and ``min.insync.replicas`` 2 from three replicas on (``topics.min_insync_replicas``
0), so that one broker may be lost without refusing or losing an acknowledged write. A topic that exists is left as
it is, but :func:`create_topics` says when it has fewer replicas than wanted or a partition whose replicas are
not all in sync (a broker down or catching up).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from confluent_kafka import KafkaException, TopicCollection
from confluent_kafka.admin import NewTopic, TopicMetadata

from lrustream.kernel.config import Config
from lrustream.kernel.kafka import admin, min_insync_for, replicas_for

log = logging.getLogger(__name__)


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


def replication(cfg: Config, brokers: int) -> tuple[int, dict[str, str]]:
    """The replication factor of topics created on a cluster of ``brokers``, and the topic settings it implies
    (``min.insync.replicas``); -1 leaves both to the brokers' defaults."""
    t = cfg.topics
    factor = replicas_for(brokers) if t.replication_factor == 0 else t.replication_factor
    if factor == -1 and not t.min_insync_replicas:
        return factor, {}
    return factor, {"min.insync.replicas": str(t.min_insync_replicas or min_insync_for(factor))}


def create_topics(cfg: Config, timeout_s: float = 30.0) -> dict[str, str]:
    """Create missing topics; returns name -> 'created' | 'exists' | 'exists, <what is wrong with its
    replication>' (:func:`replication_shortfall`). Raises on any other failure."""
    client = admin(cfg)
    metadata = client.list_topics(timeout=timeout_s)
    factor, settings = replication(cfg, len(metadata.brokers))
    result = {}
    wanted = []
    for spec in topic_specs(cfg):
        if spec.name in metadata.topics:
            shortfall = replication_shortfall(metadata.topics[spec.name], factor)
            result[spec.name] = f"exists, {shortfall}" if shortfall else "exists"
            if shortfall:
                log.warning("topic %s: %s", spec.name, shortfall)
        else:
            wanted.append(NewTopic(spec.name, spec.partitions, factor, config={**settings, **spec.config}))
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


def replication_shortfall(topic: TopicMetadata, factor: int) -> str:
    """What is wrong with ``topic``'s replication ("" when nothing): fewer replicas than ``factor`` (-1: not
    checked), or partitions with replicas out of sync."""
    partitions = topic.partitions.values()
    fewest = min((len(p.replicas) for p in partitions), default=0)
    lagging = sorted(p.id for p in partitions if len(p.isrs) < len(p.replicas))
    problems = []
    if factor > 0 and fewest < factor:
        problems.append(f"{fewest} replica{'s' if fewest != 1 else ''} where {factor} are wanted")
    if lagging:
        problems.append(f"under-replicated: partition{'s' if len(lagging) > 1 else ''} "
                        f"{', '.join(map(str, lagging))} with replicas out of sync")
    return "; ".join(problems)


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
