"""Producer and consumer tools (lrustream/replay.py, lrustream/recommendations.py) and their commands, against
the real test broker."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from itertools import islice
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from typer.testing import CliRunner

from lrustream.cli import app
from lrustream.kernel.config import Config
from lrustream.kernel.errors import LrustreamError, UsageError
from lrustream.kernel.kafka import KafkaUnavailable, MissingTopic, librdkafka_config, partition_of, producer_config
from lrustream.recommendations import read_recommendations
from lrustream.replay import replay
from stream.events import parse_event
from stream.topics import create_topics, partition_counts
from tests.conftest import REPO
from trainer.data import load_sequences


def write_udata(folder: Path, users: int, items: int, seed: int = 0) -> Path:
    """A MovieLens u.data where every user rates every item once (so LRURec's >= 5 filter keeps all rows),
    in a shuffled order with timestamps that tie across users (the replay must keep each user's order)."""
    rng = random.Random(seed)
    rows = []
    for u in range(1, users + 1):
        order = rng.sample(range(1, items + 1), items)
        start = 880_000_000 + rng.randrange(50)
        rows += [f"{u}\t{i}\t{rng.randint(1, 5)}\t{start + 3 * pos}" for pos, i in enumerate(order)]
    rng.shuffle(rows)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("\n".join(rows) + "\n")
    return folder


def read_all(cfg: Config, topic: str, expect: int, timeout_s: float = 30.0) -> list:
    consumer = Consumer(librdkafka_config(cfg, **{"group.id": f"check-{topic}", "auto.offset.reset": "earliest",
                                                  "enable.auto.commit": False}))
    consumer.subscribe([topic])
    out: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and len(out) < expect:
            out += [m for m in consumer.consume(500, timeout=0.5) if not m.error()]
        extra_until = time.monotonic() + 1.0  # a moment more, to see duplicates if there were any
        while time.monotonic() < extra_until:
            out += [m for m in consumer.consume(500, timeout=0.2) if not m.error()]
    finally:
        consumer.close()
    return out


def produce_raw(cfg: Config, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    producer = Producer(producer_config(cfg))
    for key, value in records:
        producer.produce(topic, value, key)
    assert producer.flush(30) == 0


def rec(user: str, n: int) -> bytes:
    return json.dumps({"user_id": user, "items": [f"i{n}"], "n": n}).encode()


# ----- replay -------------------------------------------------------------------------------------------------
def test_replay_publishes_valid_events_keyed_and_partitioned_like_java_clients(kafka_cfg: Config,
                                                                               tmp_path: Path) -> None:
    data = write_udata(tmp_path / "toy", users=12, items=10)
    expected = list(islice(load_sequences(data).events(), 100))
    assert replay(kafka_cfg, str(data), limit=100) == 100

    msgs = read_all(kafka_cfg, kafka_cfg.topics.interactions, 100)
    assert len(msgs) == 100
    partitions = partition_counts(kafka_cfg)[kafka_cfg.topics.interactions]
    got: dict[str, list[tuple[str, int]]] = {}
    for msg in sorted(msgs, key=lambda m: (m.partition(), m.offset())):
        ev = parse_event(msg.value(), msg.key(), msg.timestamp()[1])
        assert msg.key() == ev.user_id.encode()
        assert msg.partition() == partition_of(msg.key(), partitions), ev.user_id
        got.setdefault(ev.user_id, []).append((ev.item_id, ev.ts))
    want: dict[str, list[tuple[str, int]]] = {}
    for user, item, ts in expected:
        want.setdefault(user, []).append((item, ts))
    assert got == want  # same events, and each user's in time order within its partition
    assert all(ts == sorted(ts) for ts in ([t for _, t in evs] for evs in got.values()))


def test_replay_rate_limit_paces_events(kafka_cfg: Config, tmp_path: Path) -> None:
    data = write_udata(tmp_path / "toy", users=40, items=25)  # 1000 events
    start = time.monotonic()
    assert replay(kafka_cfg, str(data), rate=2000) == 1000
    elapsed = time.monotonic() - start
    print(f"1000 events at rate=2000/s took {elapsed:.3f} s (ideal 0.5 s)")
    assert elapsed >= 0.4


def test_replay_of_a_data_set_without_timestamps_is_refused_before_publishing(kafka_cfg: Config,
                                                                              tmp_path: Path) -> None:
    (tmp_path / "lrurec").mkdir()
    (tmp_path / "lrurec" / "sequences.txt").write_text("1 1 2 3 4 5\n2 2 3 4 5 1\n")
    with pytest.raises(Exception, match="no timestamps") as info:
        replay(kafka_cfg, str(tmp_path / "lrurec"))
    assert isinstance(info.value, LrustreamError)  # the CLI prints its one line and exits 1


def test_replay_to_an_unreachable_broker_fails_with_kafka_unavailable(kafka_cfg: Config, tmp_path: Path) -> None:
    from lrustream.broker import free_port

    kafka_cfg.kafka.bootstrap_servers = f"127.0.0.1:{free_port()}"
    data = write_udata(tmp_path / "toy", users=6, items=6)
    with pytest.raises(KafkaUnavailable, match="cannot create topics"):
        replay(kafka_cfg, str(data), limit=5, timeout_s=2)


# ----- read_recommendations --------------------------------------------------------------------------------------
def test_read_recommendations_stops_at_the_end_filters_and_skips_junk(kafka_cfg: Config,
                                                                      capsys: pytest.CaptureFixture) -> None:
    create_topics(kafka_cfg)
    topic = kafka_cfg.topics.recommendations
    assert list(read_recommendations(kafka_cfg)) == []  # empty topic: returns at once
    records = [(u.encode(), rec(u, n)) for n, u in enumerate(["a", "b", "a", "c", "a", "b"])]
    produce_raw(kafka_cfg, topic, [*records[:3], (b"a", b"not json"), (b"b", b"[1, 2]"), *records[3:]])

    got = list(read_recommendations(kafka_cfg, follow=False))
    assert sorted(r["n"] for r in got) == list(range(6))
    assert "non-JSON record" in capsys.readouterr().err
    only_a = list(read_recommendations(kafka_cfg, user="a"))
    assert [r["n"] for r in only_a] == [0, 2, 4]  # one user: one partition, in order
    assert list(read_recommendations(kafka_cfg, from_beginning=False)) == []


@pytest.mark.timeout(60)
def test_read_recommendations_follow_sees_records_produced_later(kafka_cfg: Config) -> None:
    create_topics(kafka_cfg)
    topic = kafka_cfg.topics.recommendations
    produce_raw(kafka_cfg, topic, [(b"a", rec("a", 0))])
    later = threading.Timer(1.0, produce_raw, (kafka_cfg, topic, [(b"b", rec("b", 1)), (b"a", rec("a", 2))]))
    later.start()
    stream = read_recommendations(kafka_cfg, follow=True)
    try:
        got = list(islice(stream, 3))
    finally:
        stream.close()
        later.join()
    assert sorted(r["n"] for r in got) == [0, 1, 2]


def test_read_recommendations_of_a_missing_topic_says_so(kafka_cfg: Config) -> None:
    with pytest.raises(MissingTopic, match="topics create"):
        list(read_recommendations(kafka_cfg))


# ----- commands -------------------------------------------------------------------------------------------------
def test_produce_and_recs_commands(kafka_cfg: Config, kafka_overrides: list[str], tmp_path: Path) -> None:
    runner = CliRunner()
    data = write_udata(tmp_path / "toy", users=8, items=8)
    result = runner.invoke(app, ["produce", "--data", str(data), "--limit", "20", "--rate", "5000",
                                 *kafka_overrides])
    assert result.exit_code == 0, result.output
    assert f"published 20 events to {kafka_cfg.topics.interactions}" in result.output
    assert len(read_all(kafka_cfg, kafka_cfg.topics.interactions, 20)) == 20

    produce_raw(kafka_cfg, kafka_cfg.topics.recommendations, [(u.encode(), rec(u, n)) for n, u in enumerate("xyx")])
    result = runner.invoke(app, ["recs", *kafka_overrides])
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(line)["n"] for line in result.stdout.splitlines()) == [0, 1, 2]
    result = runner.invoke(app, ["recs", "--user", "x", *kafka_overrides])
    assert [json.loads(line)["n"] for line in result.stdout.splitlines()] == [0, 2]

    result = runner.invoke(app, ["produce", "--data", str(data), "--rate", "0", *kafka_overrides])
    assert isinstance(result.exception, UsageError)


def test_recs_piped_into_head_ends_quietly(kafka_cfg: Config, kafka_overrides: list[str]) -> None:
    create_topics(kafka_cfg)
    produce_raw(kafka_cfg, kafka_cfg.topics.recommendations, [(b"u", rec("u", n)) for n in range(3000)])
    cmd = [sys.executable, "-m", "lrustream.cli", "recs", *kafka_overrides]
    recs = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert recs.stdout is not None
    first = recs.stdout.readline()
    recs.stdout.close()  # what `| head -1` does after its line
    _, err = recs.communicate(timeout=60)
    assert json.loads(first)["n"] == 0
    assert recs.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


def test_a_benchmark_deletes_its_own_topics_and_refuses_to_delete_any_other(kafka_overrides: list[str],
                                                                           tmp_path: Path) -> None:
    from lrustream.bench.stream import drop_topics, topic_overrides
    from lrustream.kernel.config import load_config
    from stream.topics import topic_specs

    cfg = load_config(overrides=topic_overrides(kafka_overrides, f"drop-{random.randrange(10**6)}", tmp_path))
    create_topics(cfg)
    names = {spec.name for spec in topic_specs(cfg)}
    assert names <= set(partition_counts(cfg))
    reported: list[str] = []
    drop_topics(cfg, reported.append)
    assert reported == []
    deadline = time.monotonic() + 30
    while names & set(partition_counts(cfg)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not names & set(partition_counts(cfg))
    with pytest.raises(ValueError, match="not a benchmark's own"):  # refused before any call to the broker
        drop_topics(load_config(overrides=kafka_overrides), reported.append)
