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

import socket
import time
from typing import Any

from lrustream.kernel.config import Config
from lrustream.kernel.kafka import admin, partition_of, topic_partitions

OWNERS_TTL_S = 2.0  # how long a group description answers "who owns partition p"
URL_MARK = " url="  # in a worker's client.id, what precedes its advertised HTTP address


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
