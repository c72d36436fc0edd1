"""The ``model-updates`` topic: the trainer (or an operator's rollback) announces a version; workers follow.

A message is JSON ``{"version": "v000007", "reason": "fine-tune" | "rollback" | ..., "ts": epoch ms}``. The
model store stays the source of truth (workers load and verify the version from it); the message only says
"look now", so a lost message costs at most one poll of the store's CURRENT pointer.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from lrustream.config import Config
from stream.kafka import librdkafka_config, producer_config

log = logging.getLogger("lrustream.updates")


def announce(cfg: Config, version: str, reason: str, **extra: Any) -> None:
    """Publish a model-update message and wait for the broker's acknowledgement."""
    from confluent_kafka import Producer

    producer = Producer(producer_config(cfg))
    body = {"version": version, "reason": reason, "ts": int(time.time() * 1000), **extra}
    producer.produce(cfg.topics.model_updates, json.dumps(body).encode(), version.encode())
    if producer.flush(30):
        raise RuntimeError(f"model update for {version} not acknowledged by the broker")


class UpdateFollower:
    """Reads announcements published after it started (each worker on its own: no consumer group)."""

    def __init__(self, cfg: Config) -> None:
        from confluent_kafka import Consumer

        self.consumer = Consumer(librdkafka_config(cfg, **{
            "group.id": f"{cfg.stream.app_id}-updates-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
            "auto.offset.reset": "latest"}))
        self.consumer.subscribe([cfg.topics.model_updates])

    def next_version(self, timeout_s: float) -> str | None:
        msg = self.consumer.poll(timeout_s)
        if msg is None or msg.error():
            return None
        try:
            body = json.loads(msg.value())
            if "request" in body:  # a refresh request for the trainer
                return None
            version = body["version"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed model-update message at offset %s", msg.offset())
            return None
        return version if isinstance(version, str) else None

    def close(self) -> None:
        self.consumer.close()


def request_refresh(cfg: Config, who: str) -> None:
    """Ask the trainer for a fine-tuning round now (a message on the model-updates topic workers ignore)."""
    from confluent_kafka import Producer

    producer = Producer(producer_config(cfg))
    body = {"request": "refresh", "by": who, "ts": int(time.time() * 1000)}
    producer.produce(cfg.topics.model_updates, json.dumps(body).encode(), b"refresh")
    if producer.flush(30):
        raise RuntimeError("refresh request not acknowledged by the broker")
