"""Kafka client settings from our config: one mapping for librdkafka (confluent-kafka) and one for Faust.

Security settings (``kafka.security.*``) pass through to every client we create, so a deployment on SASL/SSL
changes config, never code. Secrets are never logged: :func:`redacted` is what may be printed.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any

from lrustream.config import Config, sasl_mechanism

SECRET_KEYS = ("sasl.password", "ssl.key.password", "sasl_plain_password", "password")

# Producers must partition keys as Java clients and aiokafka (Faust) do, so that a user's events, state
# and recommendations all land on the same partition number: murmur2 (see stream/README.md).
PARTITIONER = "murmur2_random"


def librdkafka_config(cfg: Config, **extra: Any) -> dict[str, Any]:
    """Settings for confluent-kafka Producer/Consumer/AdminClient."""
    sec = cfg.kafka.security
    conf: dict[str, Any] = {
        "bootstrap.servers": cfg.kafka.bootstrap_servers,
        "client.id": cfg.kafka.client_id,
        "security.protocol": sec.protocol,
    }
    if mechanism := sasl_mechanism(cfg):  # the one Faust gets too; never librdkafka's own default (GSSAPI)
        conf.update({"sasl.mechanism": mechanism, "sasl.username": sec.sasl_username,
                     "sasl.password": sec.sasl_password})
    if sec.ssl_cafile:
        conf["ssl.ca.location"] = sec.ssl_cafile
    if sec.ssl_certfile:
        conf["ssl.certificate.location"] = sec.ssl_certfile
    if sec.ssl_keyfile:
        conf["ssl.key.location"] = sec.ssl_keyfile
    if sec.protocol.endswith("SSL") and not sec.ssl_check_hostname:
        conf["ssl.endpoint.identification.algorithm"] = "none"
    conf.update(extra)
    return conf


def producer_config(cfg: Config, **extra: Any) -> dict[str, Any]:
    base = {"partitioner": PARTITIONER, "enable.idempotence": True, "linger.ms": 5,
            "compression.type": "lz4"}
    base.update(extra)
    return librdkafka_config(cfg, **base)


def faust_broker_settings(cfg: Config) -> dict[str, Any]:
    """Keyword arguments for ``faust.App`` (aiokafka underneath) carrying the same security settings."""
    sec = cfg.kafka.security
    servers = [f"kafka://{s.strip()}" for s in cfg.kafka.bootstrap_servers.split(",") if s.strip()]
    settings: dict[str, Any] = {"broker": servers}
    mechanism = sasl_mechanism(cfg)  # validated, and the one librdkafka gets: no client default applies
    if sec.protocol == "PLAINTEXT":
        return settings
    import faust

    context = None
    if sec.protocol.endswith("SSL"):
        context = ssl.create_default_context(cafile=sec.ssl_cafile)
        context.check_hostname = sec.ssl_check_hostname
        if sec.ssl_certfile:
            context.load_cert_chain(sec.ssl_certfile, sec.ssl_keyfile)
    if mechanism:
        settings["broker_credentials"] = faust.SASLCredentials(
            username=sec.sasl_username, password=sec.sasl_password, mechanism=mechanism, ssl_context=context)
    else:
        settings["broker_credentials"] = faust.SSLCredentials(context)
    return settings


class MissingTopic(RuntimeError):
    """A topic the caller needs does not exist (or has no partitions) on the cluster."""


def topic_partitions(consumer: Any, topic: str, timeout_s: float = 10.0) -> list[int]:
    """The partition numbers of ``topic``; :class:`MissingTopic` with the fix when it is not there."""
    md = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if md is None or md.error is not None or not md.partitions:
        why = md.error.str() if md is not None and md.error is not None else "no partitions"
        raise MissingTopic(f"topic {topic} is not readable ({why}); `lrustream topics create` makes it")
    return sorted(md.partitions)


def transient(exc: Exception) -> bool:
    """Whether a KafkaException is worth retrying. confluent-kafka does not flag the errors of synchronous
    calls such as ``get_watermark_offsets`` as retriable, so the codes that mean "not ready yet" are listed."""
    from confluent_kafka import KafkaError

    err = exc.args[0] if exc.args else None
    if not isinstance(err, KafkaError):
        return False
    return err.retriable() or err.code() in {
        KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.REQUEST_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
        KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS}


def high_watermarks(consumer: Any, topic: str, partitions: list[int], timeout_s: float = 10.0) -> dict[int, int]:
    """Each partition's end offset, retrying what Kafka calls retriable until ``timeout_s``: just after a
    topic is created its partitions can answer NOT_LEADER for a moment (seen failing a test run)."""
    from confluent_kafka import KafkaException, TopicPartition

    deadline = time.monotonic() + timeout_s
    out: dict[int, int] = {}
    for p in partitions:
        while p not in out:
            try:
                out[p] = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1]
            except KafkaException as exc:
                if not transient(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    return out


def redacted(conf: dict[str, Any]) -> dict[str, Any]:
    return {k: ("***" if any(s in k for s in SECRET_KEYS) and v is not None else v) for k, v in conf.items()}


def quiet_logger(name: str = "lrustream.kafka") -> logging.Logger:
    """A logger for librdkafka's own messages: routed to Python logging at WARNING, never to raw stderr."""
    return logging.getLogger(name)
