"""The local cluster's layout and the replication it implies, without starting a broker: node ports and dirs,
the static quorum every node is formatted with, the internal topics' replication, the bootstrap list the default
config derives, and what ``topics create`` says of a topic whose replicas are short or out of sync."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from lrustream.broker import BrokerError, LocalCluster
from lrustream.kernel.config import ConfigError, load_config
from lrustream.kernel.kafka import min_insync_for, replicas_for
from stream.topics import replication, replication_shortfall


def test_three_nodes_get_port_pairs_own_dirs_one_quorum_and_one_cluster_id(tmp_path: Path) -> None:
    cfg = load_config(overrides=[f"broker.data_dir={tmp_path}", "broker.port=19092", "broker.nodes=3"])
    cluster = LocalCluster.from_config(cfg)
    assert [(n.node_id, n.port, n.controller_port) for n in cluster.nodes] == [
        (1, 19092, 19093), (2, 19094, 19095), (3, 19096, 19097)]
    assert [n.data_dir for n in cluster.nodes] == [tmp_path / f"node-{i}" for i in (1, 2, 3)]
    assert {n.voters for n in cluster.nodes} == {"1@127.0.0.1:19093,2@127.0.0.1:19095,3@127.0.0.1:19097"}
    assert len({n.cluster_id for n in cluster.nodes}) == 1
    assert LocalCluster.from_config(cfg).nodes[0].cluster_id == cluster.nodes[0].cluster_id  # kept beside them
    assert cluster.bootstrap == cfg.kafka.bootstrap_servers == "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096"


def test_each_node_writes_its_id_the_quorum_and_replicated_internal_topics(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, tmp_path / "jars", [19092, 19094, 19096], [19093, 19095, 19097])
    node = cluster.node(2)
    node.data_dir.mkdir(parents=True)
    node._write_config()
    props = dict(line.split("=", 1) for line in node.properties_file.read_text().splitlines())
    assert props["node.id"] == "2"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093,2@127.0.0.1:19095,3@127.0.0.1:19097"
    assert "controller.quorum.bootstrap.servers" not in props
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor",
                "default.replication.factor"):
        assert props[key] == "3", key
    assert props["transaction.state.log.min.isr"] == props["min.insync.replicas"] == "2"


def test_one_node_is_the_single_broker_in_the_data_dir_itself(tmp_path: Path) -> None:
    cfg = load_config(overrides=[f"broker.data_dir={tmp_path}", "broker.port=19092"])
    (node,) = LocalCluster.from_config(cfg).nodes
    assert node.data_dir == tmp_path and node.voters == "" and node.replicas == 1
    node.data_dir.mkdir(parents=True, exist_ok=True)
    node._write_config()
    props = dict(line.split("=", 1) for line in node.properties_file.read_text().splitlines())
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert props["offsets.topic.replication.factor"] == props["min.insync.replicas"] == "1"
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:19092"


def test_a_node_that_does_not_exist_is_one_clear_error(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, tmp_path / "jars", [19092, 19094, 19096], [19093, 19095, 19097])
    with pytest.raises(BrokerError, match="nodes 1 to 3"):
        cluster.node(4)
    with pytest.raises(ConfigError, match=r"broker\.nodes"):
        load_config(overrides=["broker.nodes=0"])


def test_replication_follows_the_cluster_size_unless_set() -> None:
    assert [replicas_for(n) for n in (1, 2, 3, 5)] == [1, 2, 3, 3]
    assert [min_insync_for(r) for r in (1, 2, 3)] == [1, 1, 2]
    cfg = load_config()
    assert replication(cfg, 1) == (1, {"min.insync.replicas": "1"})
    assert replication(cfg, 5) == (3, {"min.insync.replicas": "2"})
    assert replication(load_config(overrides=["topics.replication_factor=2"]), 5) == (2, {"min.insync.replicas": "1"})
    assert replication(load_config(overrides=["topics.replication_factor=-1"]), 3) == (-1, {})
    assert replication(load_config(overrides=["topics.replication_factor=-1", "topics.min_insync_replicas=2"]),
                       3) == (-1, {"min.insync.replicas": "2"})


def _topic(*partitions: tuple[list[int], list[int]]) -> SimpleNamespace:
    return SimpleNamespace(partitions={i: SimpleNamespace(id=i, replicas=r, isrs=isr)
                                       for i, (r, isr) in enumerate(partitions)})


def test_topics_create_says_when_replicas_are_short_or_out_of_sync() -> None:
    whole = _topic(([1, 2, 3], [1, 2, 3]), ([2, 3, 1], [2, 3, 1]))
    assert replication_shortfall(whole, 3) == ""
    assert replication_shortfall(_topic(([1], [1])), 3) == "1 replica where 3 are wanted"
    lagging = _topic(([1, 2, 3], [1, 3]), ([2, 3, 1], [2, 3, 1]), ([3, 1, 2], [3]))
    assert replication_shortfall(lagging, 3) == "under-replicated: partitions 0, 2 with replicas out of sync"
    assert replication_shortfall(_topic(([1], [1])), -1) == ""
