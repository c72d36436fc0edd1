"""The ``model-updates`` topic: operators ask the trainer for a fine-tuning round now.

A message is JSON ``{"request": "refresh", "by": who, "ts": epoch ms}`` (``lrustream refresh``, the worker's
``POST /refresh``). Model versions themselves, and which one to serve, travel on the model-versions topic
(stream/versions.py).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from lrustream.kernel.config import Config
from lrustream.kernel.kafka import assigned_reader, produce_all, producer_config

log = logging.getLogger("lrustream.updates")


class UpdateFollower:
    """Reads the messages published after it started. Each reader on its own: it assigns every partition at
    the end itself and commits nothing, so there is no group to join or rebalance, before or after a broker
    restart, and no committed offset to look up (that lookup can hang for ever, librdkafka #5586)."""

    def __init__(self, cfg: Config) -> None:
        self.consumer, _ = assigned_reader(cfg, cfg.topics.model_updates, f"{cfg.stream.app_id}-updates",
                                           from_beginning=False)

    def next_message(self, timeout_s: float) -> dict[str, Any] | None:
        """The next request, parsed; None on timeout or a malformed message."""
        msg = self.consumer.poll(timeout_s)
        if msg is None or msg.error():
            return None
        try:
            body = json.loads(msg.value())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            log.warning("ignoring malformed model-update message at offset %s", msg.offset())
            return None
        return body

    def close(self) -> None:
        self.consumer.close()


def request_refresh(cfg: Config, who: str) -> None:
    """Ask the trainer for a fine-tuning round now, and wait for the broker's acknowledgement."""
    from confluent_kafka import Producer

    body = {"request": "refresh", "by": who, "ts": int(time.time() * 1000)}
    produce_all(Producer(producer_config(cfg)), cfg.topics.model_updates, [(b"refresh", json.dumps(body).encode())])
