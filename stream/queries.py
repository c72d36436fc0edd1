"""Which worker answers a request for a user: the one that owns the user's input partition.

A user's events, state and recommendations all live in partition ``partition_of(user_id, partitions)``
(murmur2 of the key, as every producer partitions: lrustream.kernel.kafka). A worker owns the partitions the
consumer group assigns it, and only the owner holds the user's latest state; any other worker answers with a
redirect to the owner. Owners are found as Kafka Streams' interactive queries find them, from the group's own
assignment: every worker's input consumer carries its advertised HTTP address in its ``client.id``
(:func:`worker_client_id`), and ``DescribeConsumerGroups`` lists each member's ``client.id`` with its
partitions. No other channel, no extra topic; a description is cached for OWNERS_TTL_S and read again at once
when it names no owner, or names this worker for a partition it does not hold (a rebalance under way).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlencode

from lrustream.kernel.config import Config
from lrustream.kernel.kafka import admin, partition_of, topic_partitions

OWNERS_TTL_S = 2.0  # how long a group description answers "who owns partition p"
URL_MARK = " url="  # in a worker's client.id, what precedes its advertised HTTP address
_BAD_ESCAPE = re.compile("%(?![0-9A-Fa-f]{2})")  # a "%" that does not start a percent-escape (RFC 3986)


def user_in_path(raw: str) -> str:
    """The user id that the last segment of a request's path carries as sent (``raw``: still percent-encoded),
    decoded as UTF-8. ValueError (one line) when the segment is not percent-encoded UTF-8: a ``%`` that starts no
    escape (``%zz``), or bytes that are not UTF-8 (``%FF``). aiohttp passes such a segment on undecoded, so
    ``/recommendations/%FF`` was answered for the user named ``%FF`` (whose own address is ``%25FF``)."""
    if (bad := _BAD_ESCAPE.search(raw)) is not None:
        raise ValueError(f"invalid user_id: '%' at {bad.start()} of the path segment starts no percent-escape")
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeError as exc:
        raise ValueError(f"invalid user_id: not percent-encoded UTF-8 ({exc.reason})") from None


def redirect_location(owner: str, user: str, query: Mapping[str, str]) -> str:
    """Where a request for ``user`` goes on the worker at ``owner``: GET /recommendations/{user_id} with the id
    percent-encoded as UTF-8, every reserved character included (``/``, ``%``, ``?``, ``+``), so that it stays one
    path segment and the owner decodes the same id; the query as received, re-encoded (none: no ``?``)."""
    path = f"{owner}/recommendations/{quote(user, safe='', encoding='utf-8')}"
    return f"{path}?{urlencode(query)}" if query else path


def advertised_url(cfg: Config) -> str:
    """Where other workers send clients for the users this worker owns: ``http.advertised_url``, else the
    bind address (the host's name when that is every interface)."""
    if cfg.http.advertised_url:
        return cfg.http.advertised_url.rstrip("/")
    host = cfg.http.host if cfg.http.host not in ("0.0.0.0", "::", "") else socket.getfqdn()
    return f"http://{host}:{cfg.http.port}"


def worker_client_id(cfg: Config) -> str:
    """The ``client.id`` of a worker's input consumer: the configured one plus its advertised address."""
    return f"{cfg.kafka.client_id}{URL_MARK}{advertised_url(cfg)}"


class Owners:
    """The owner of each input partition, as the consumer group ``stream.app_id`` last described it."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.me = advertised_url(cfg)
        self._admin: Any = None
        self._owners: dict[int, str] = {}
        self._read_at = float("-inf")
        self._partitions: int | None = None  # of the input topic, as last read

    def partition_of(self, user: str) -> int | None:
        """The input partition of ``user``'s events (None until :meth:`refresh` has read the topic's size)."""
        return None if self._partitions is None else partition_of(user.encode(), self._partitions)

    def owner(self, partition: int) -> str | None:
        """The advertised URL of the worker that owns ``partition``, which this one does not hold (None: no member
        holds it now). Blocks for one admin request when the cached description is old, names no owner, or names
        this worker (it held the partition before a rebalance)."""
        url = self._owners.get(partition)
        fresh = time.monotonic() - self._read_at < OWNERS_TTL_S
        if not fresh or url is None or url == self.me:
            self.refresh()
            url = self._owners.get(partition)
        return url

    def refresh(self) -> None:
        """Read the input topic's size and the group's assignment (one metadata and one admin request)."""
        from confluent_kafka import ConsumerGroupState

        if self._admin is None:
            self._admin = admin(self.cfg)
        topic = self.cfg.topics.interactions
        self._partitions = len(topic_partitions(self._admin, topic))
        group = self.cfg.stream.app_id
        description = self._admin.describe_consumer_groups([group], request_timeout=5)[group].result()
        owners = {}
        if description.state == ConsumerGroupState.STABLE:
            for member in description.members:
                _, mark, url = member.client_id.partition(URL_MARK)
                for tp in member.assignment.topic_partitions if mark else []:
                    if tp.topic == topic:
                        owners[tp.partition] = url
        self._owners, self._read_at = owners, time.monotonic()
