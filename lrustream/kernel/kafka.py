"""Every Kafka client call we make the same way everywhere, and the client settings from our config.

- Settings: one mapping for librdkafka (confluent-kafka, :func:`librdkafka_config`, :func:`producer_config`)
  and one for Faust (:func:`faust_broker_settings`). Security settings (``kafka.security.*``) pass through to
  every client we create, so a deployment on SASL/SSL changes config, never code. Secrets are never logged:
  :func:`redacted` is what may be printed.
- Producing: :func:`produce` is the only place that hands a record to librdkafka. When librdkafka's local
  queue is full ``Producer.produce`` raises ``BufferError`` instead of waiting; :func:`produce` serves delivery
  callbacks until there is room (confluent-kafka-python #16, "Queue full"). :class:`Deliveries` collects the
  delivery reports; :func:`flush` waits for them a slice at a time, so that a stopping worker is not held up;
  :func:`await_deliveries` waits for them and raises :class:`KafkaUnavailable` for any that failed or never
  came; :func:`produce_all` is produce, Deliveries and await_deliveries together.
- Metadata and admin: :func:`admin`, :func:`topic_partitions`, :func:`high_watermarks` (retrying what is only
  "not ready yet", :func:`transient`); :func:`read_to_end` for readers that start from a topic's beginning.
- Errors: :class:`KafkaUnavailable` (Kafka did not take or acknowledge what we sent, or cannot be reached) and
  :class:`MissingTopic`, both :class:`~lrustream.kernel.errors.LrustreamError`.
"""

from __future__ import annotations

import logging
import re
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from lrustream.kernel.config import Config, sasl_mechanism
from lrustream.kernel.errors import LrustreamError

SECRET_KEYS = ("sasl.password", "ssl.key.password", "sasl_plain_password", "password")

# Producers must partition keys as Java clients and aiokafka (Faust) do, so that a user's events, state
# and recommendations all land on the same partition number: murmur2 (see stream/README.md).
PARTITIONER = "murmur2_random"


def partition_of(key: bytes, partitions: int) -> int:
    """The partition :data:`PARTITIONER` puts ``key`` in, among ``partitions`` (which worker owns a user)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def murmur2(data: bytes) -> int:
    """Apache Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), as a signed 32-bit int: the hash
    Java clients, aiokafka, Faust and librdkafka's ``murmur2_random`` partition keys with, written here from its
    published definition."""
    mask, m, r = 0xFFFFFFFF, 0x5BD1E995, 24
    length = len(data)
    h = (0x9747B28C ^ length) & mask
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & mask
        k ^= k >> r
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    tail = data[length - length % 4:]
    if tail:
        for shift, byte in enumerate(tail):
            h ^= byte << (8 * shift)
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def replicas_for(nodes: int) -> int:
    """Replicas of every topic on a cluster of ``nodes`` brokers: three where there are three, else all."""
    return max(1, min(3, nodes))


def min_insync_for(replicas: int) -> int:
    """``min.insync.replicas`` for topics of ``replicas`` replicas: 2 from three replicas on (one broker may be
    lost without refusing writes, and an acknowledged write is on two), else 1."""
    return 2 if replicas >= 3 else 1


RECONNECT_BACKOFF_MAX_MS = 1000
"""The longest a client waits before trying a broker it lost again (librdkafka's default: 10 s)."""


def librdkafka_config(cfg: Config, **extra: Any) -> dict[str, Any]:
    """Settings for confluent-kafka Producer/Consumer/AdminClient."""
    sec = cfg.kafka.security
    conf: dict[str, Any] = {
        "bootstrap.servers": cfg.kafka.bootstrap_servers,
        "client.id": cfg.kafka.client_id,
        "security.protocol": sec.protocol,
        # librdkafka backs off reconnecting to a broker that refused it, doubling up to 10 s by default: a broker
        # that restarts after a few seconds down would then be reached only seconds after it answers again
        "reconnect.backoff.max.ms": RECONNECT_BACKOFF_MAX_MS,
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


class KafkaUnavailable(LrustreamError):
    """Kafka cannot be reached, or did not take or acknowledge records we sent (the message says which)."""


class MissingTopic(LrustreamError):
    """A topic the caller needs does not exist (or has no partitions) on the cluster."""


DeliveryCallback = Callable[[Any, Any], None]


def produce(producer: Any, topic: str, value: bytes | None, key: bytes | None = None, *,
            partition: int | None = None, headers: Any = None, timestamp_ms: int | None = None,
            on_delivery: DeliveryCallback | None = None, before_wait: Callable[[], None] | None = None,
            poll_s: float = 0.05) -> None:
    """Hand one record to ``producer`` (confluent-kafka). While its queue is full, serve delivery callbacks
    ``poll_s`` at a time until there is room; ``before_wait`` runs before each wait and may raise to stop
    waiting (a worker that is stopping). Delivery is reported to ``on_delivery`` later, as usual."""
    kwargs: dict[str, Any] = {"headers": headers, "on_delivery": on_delivery}
    if partition is not None:
        kwargs["partition"] = partition
    if timestamp_ms:
        kwargs["timestamp"] = timestamp_ms
    while True:
        try:
            producer.produce(topic, value, key, **kwargs)
            return
        except BufferError:
            if before_wait is not None:
                before_wait()
            producer.poll(poll_s)


class Deliveries:
    """A delivery callback that counts acknowledged and failed records and keeps the first error."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.first_error: str | None = None

    def __call__(self, err: Any, msg: Any) -> None:
        if err is None:
            self.ok += 1
            return
        self.failed += 1
        if self.first_error is None:
            self.first_error = err.str() if hasattr(err, "str") else str(err)


def flush(producer: Any, timeout_s: float, before_wait: Callable[[int], None] | None = None,
          slice_s: float = 0.5) -> int:
    """Wait up to ``timeout_s`` until every record handed to ``producer`` is acknowledged, ``slice_s`` at a time;
    between slices ``before_wait(records still pending)`` runs and may raise to stop waiting (a worker that is
    stopping sees it within a slice). Returns how many records are still pending (0: all acknowledged)."""
    deadline = time.monotonic() + timeout_s
    while (remaining := producer.flush(slice_s)) and time.monotonic() < deadline:
        if before_wait is not None:
            before_wait(remaining)
    return remaining


def await_deliveries(producer: Any, deliveries: Deliveries, what: str, timeout_s: float = 30.0) -> None:
    """Wait until every record handed to ``producer`` is acknowledged; :class:`KafkaUnavailable` naming
    ``what`` (e.g. "3 events to interactions") when any failed or is still unacknowledged after ``timeout_s``."""
    left = producer.flush(timeout_s)
    if deliveries.failed:
        raise KafkaUnavailable(f"{deliveries.failed} of {what} were not delivered: {deliveries.first_error}")
    if left:
        raise KafkaUnavailable(f"{left} of {what} still unacknowledged after {timeout_s:g} s")


def produce_all(producer: Any, topic: str, records: Iterable[tuple[Any, ...]], timeout_s: float = 30.0) -> int:
    """Produce ``(key, value)`` or ``(key, value, headers)`` records to ``topic`` and wait for every
    acknowledgement (:func:`await_deliveries`); returns how many were sent."""
    deliveries = Deliveries()
    sent = 0
    for key, value, *headers in records:
        produce(producer, topic, value, key, headers=headers[0] if headers else None, on_delivery=deliveries)
        sent += 1
    await_deliveries(producer, deliveries, f"{sent} records to {topic}", timeout_s)
    return sent


def admin(cfg: Config) -> Any:
    """An AdminClient on the configured cluster, logging through :func:`quiet_logger`."""
    from confluent_kafka.admin import AdminClient

    return AdminClient(librdkafka_config(cfg, logger=quiet_logger()))


def assigned_reader(cfg: Config, topic: str, group_prefix: str, from_beginning: bool,
                    timeout_s: float = 30.0, **extra: Any) -> tuple[Any, list[int]]:
    """A consumer that reads every partition of ``topic`` by assignment, from its beginning or its end, and its
    partitions: no group to join or rebalance, nothing committed (the group id, ``group_prefix`` plus a random
    tail, only names it). ``extra``: further librdkafka settings (fetch sizes). :class:`MissingTopic` when the
    topic is not there."""
    import uuid

    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

    consumer = Consumer(librdkafka_config(cfg, **{"group.id": f"{group_prefix}-{uuid.uuid4().hex[:8]}",
                                                  "enable.auto.commit": False, **extra}))
    try:
        partitions = topic_partitions(consumer, topic, timeout_s)
    except LrustreamError:
        consumer.close()
        raise
    start = OFFSET_BEGINNING if from_beginning else OFFSET_END
    consumer.assign([TopicPartition(topic, p, start) for p in partitions])
    return consumer, partitions


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


def read_to_end(consumer: Any, topic: str, partitions: list[int], take: Callable[[float], list[Any]],
                timeout_s: float) -> Iterator[list[Any]]:
    """What ``take(wait_s)`` returns, batch after batch, until ``consumer`` has read every partition of ``topic``
    up to its end offset as it is now; :class:`TimeoutError` past ``timeout_s``."""
    from confluent_kafka import TopicPartition

    ends = high_watermarks(consumer, topic, partitions, timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        positions = {tp.partition: tp.offset for tp in
                     consumer.position([TopicPartition(topic, p) for p in partitions])}
        if all(end == 0 or positions.get(p, -1) >= end for p, end in ends.items()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the {topic} topic was not read to its end within {timeout_s:g}s")
        yield take(0.2)


def redacted(conf: dict[str, Any]) -> dict[str, Any]:
    return {k: ("***" if any(s in k for s in SECRET_KEYS) and v is not None else v) for k, v in conf.items()}


def quiet_logger(name: str = "lrustream.kafka") -> logging.Logger:
    """A logger for librdkafka's own messages: routed to Python logging at WARNING, never to raw stderr."""
    return logging.getLogger(name)


def reason(exc: Exception) -> str:
    """The readable part of a KafkaException (its KafkaError's text, not the repr)."""
    err = exc.args[0] if exc.args else None
    return err.str() if hasattr(err, "str") else str(exc)


class _Once(logging.Filter):
    """Lets each distinct librdkafka message through once a minute: an unreachable broker otherwise prints the
    same 'connection refused' line ten times a second, while a later outage should still be reported."""

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s = every_s
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = re.sub(r"\d+ms", "", record.getMessage())
        now = time.monotonic()
        if now - self.last.get(text, -self.every_s) < self.every_s:
            return False
        if len(self.last) > 1000:
            self.last.clear()
        self.last[text] = now
        return True


def client_logger() -> logging.Logger:
    """Where the command-line tools' Kafka clients log: stderr, WARNING and up, repeats muted for a minute."""
    logger = logging.getLogger("lrustream.tools.kafka")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("kafka: %(message)s"))
        handler.addFilter(_Once())
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    return logger
