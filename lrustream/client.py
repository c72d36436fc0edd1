"""A small client for applications: send interaction events to lrustream, ask it for a user's recommendations.

    from lrustream.client import Client

    with Client(bootstrap_servers="127.0.0.1:9092", url="http://127.0.0.1:6066") as client:
        client.send("42", "2858")              # an event, keyed and partitioned as the workers expect
        client.flush()                         # every event sent so far acknowledged by Kafka, or an error
        answer = client.recommend("42", k=5)   # {"items": [...], "scores": [...], "model_version": ...}

It is the documented contract in code (stream/README.md: the interactions topic, the HTTP API), no more: any
Kafka producer and any HTTP client can do the same. ``send`` refuses an event the workers would refuse
(:class:`~stream.events.BadEvent`), so bad data fails where it is made; ``recommend`` may ask any worker (a
worker that does not own the user redirects to the one that does) and waits out a short unavailability (a
rebalance) before it gives up with :class:`ClientError`.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlencode

from lrustream.kernel.config import Config, load_config
from lrustream.kernel.errors import LrustreamError
from lrustream.kernel.kafka import Deliveries, await_deliveries, produce, producer_config
from stream.events import encode_event


class ClientError(LrustreamError):
    """A request was refused (400), or no worker could answer it in time (the message gives the worker's why)."""


class Client:
    """Events out through one Kafka producer; requests to one worker's HTTP API (``url``)."""

    def __init__(self, cfg: Config | None = None, *, bootstrap_servers: str | None = None,
                 url: str | None = None, timeout_s: float = 5.0, retries: int = 5) -> None:
        """``cfg`` (default: configs/default.yaml) names the topic and the broker; ``bootstrap_servers`` and
        ``url`` (default ``http://{http.host}:{http.port}``) override it. A request waits ``timeout_s`` for an
        answer and is tried ``retries`` more times while workers answer 503."""
        from confluent_kafka import Producer

        cfg = cfg or load_config()
        if bootstrap_servers:
            cfg = dataclasses.replace(cfg, kafka=dataclasses.replace(cfg.kafka, bootstrap_servers=bootstrap_servers))
        self.cfg = cfg
        self.url = (url or f"http://{self.cfg.http.host}:{self.cfg.http.port}").rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self._producer = Producer(producer_config(self.cfg))
        self._deliveries = Deliveries()
        self._sent = 0

    def send(self, user_id: str | int, item_id: str | int, ts: int | None = None,
             event_id: str | int | None = None) -> None:
        """Send one interaction (``ts`` in epoch ms, default now); acknowledged by the next :meth:`flush`."""
        key, value = encode_event(user_id, item_id, int(time.time() * 1000) if ts is None else ts, event_id)
        produce(self._producer, self.cfg.topics.interactions, value, key, on_delivery=self._deliveries)
        self._sent += 1

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every event sent so far is acknowledged; KafkaUnavailable when any was not."""
        sent, self._sent = self._sent, 0
        deliveries, self._deliveries = self._deliveries, Deliveries()
        await_deliveries(self._producer, deliveries, f"{sent} events to {self.cfg.topics.interactions}", timeout_s)

    def recommend(self, user_id: str | int, k: int | None = None, exclude: Iterable[str] = ()) -> dict[str, Any]:
        """The user's top-``k`` now (GET /recommendations/{user_id}); ``"fallback": "popular"`` in the answer
        when the model cannot rank for the user (stream/README.md, "Requests")."""
        return recommend(self.url, user_id, k, exclude, token=self.cfg.http.token, timeout_s=self.timeout_s,
                         retries=self.retries)

    def close(self) -> None:
        """Wait (briefly) for what was sent; events sent and never flushed may be lost."""
        self._producer.flush(5)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def recommendations_url(url: str, user_id: str | int, k: int | None = None, exclude: Iterable[str] = ()) -> str:
    """The GET /recommendations/{user_id} address on the worker at ``url``, with its ``k`` and ``exclude``
    (comma-separated) query parameters when given."""
    exclude = list(exclude)
    query = {**({"k": str(k)} if k is not None else {}), **({"exclude": ",".join(exclude)} if exclude else {})}
    return (f"{url.rstrip('/')}/recommendations/{quote(str(user_id), safe='')}"
            + (f"?{urlencode(query)}" if query else ""))


def recommend(url: str, user_id: str | int, k: int | None = None, exclude: Iterable[str] = (), *,
              token: str | None = None, timeout_s: float = 5.0, retries: int = 5) -> dict[str, Any]:
    """Ask the worker at ``url`` for the user's top-``k`` (the answer's JSON object). A worker that does not own
    the user answers 307 to the one that does, which urllib follows for a GET, keeping the headers; ``token``
    goes as ``Authorization: Bearer TOKEN``. 503 (a rebalance) and unreachable workers are tried ``retries``
    more times; then, or on any other error status, :class:`ClientError` with the worker's why."""
    address = recommendations_url(url, user_id, k, exclude)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(address, headers=headers), timeout=timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            why = _error_of(exc)
            if exc.code != 503 or attempt == retries:
                raise ClientError(f"GET {address}: {exc.code} {why}") from None
            time.sleep(float(exc.headers.get("Retry-After", "1")))
        except OSError as exc:
            if attempt == retries:
                raise ClientError(f"GET {address}: {exc}") from None
            time.sleep(1.0)
    raise AssertionError("unreachable")


def _error_of(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", ""))
    except ValueError:
        return ""
