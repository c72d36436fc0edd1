"""Poison records on the real broker: one bad record costs only itself, never the partition."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

from lrustream.kernel.config import Config
from stream.topics import create_topics
from tests.streamkit import WorkerProcess, publish_model, read_topic, recommendations

BIG_VALUE_BYTES = 1_030_000  # under the broker's 1 MiB record limit, over the producer's default 1,000,000


def _kcat_produce(kcat: tuple[str, dict[str, str]], cfg: Config, lines: list[bytes]) -> None:
    """Records ``key|value`` through kcat (murmur2, like every producer must), big records allowed."""
    path, env = kcat
    subprocess.run([path, "-b", cfg.kafka.bootstrap_servers, "-t", cfg.topics.interactions, "-P", "-K|",
                    "-X", "partitioner=murmur2_random", "-X", "message.max.bytes=1048576"],
                   input=b"\n".join(lines) + b"\n", check=True, timeout=60, env=env)


def _event(user: str, item: str, ts: int) -> bytes:
    return json.dumps({"user_id": user, "item_id": item, "ts": ts}).encode()


def test_an_oversized_record_and_a_bad_key_are_dead_lettered_and_the_stream_moves_on(
        kafka_cfg: Config, kafka_overrides: list[str], tmp_path: Path, kcat: tuple[str, dict[str, str]]) -> None:
    """The reported scenario: two good events of user A, a 1.03 MB record (the broker takes it; its dead-letter
    copy is too big for the worker's producer), a record whose key is not UTF-8, then 8 s later a good event of
    user B. Every good event gets exactly one recommendation, within seconds; both refused records are in the
    dead-letter topic, the big one as a truncated copy that says so."""
    create_topics(kafka_cfg)
    publish_model(kafka_cfg)
    big = json.dumps({"user_id": "A", "item_id": "i3", "ts": 3, "pad": "x" * BIG_VALUE_BYTES}).encode()
    bad_key = b"\xff\xfeA"
    worker = WorkerProcess(kafka_overrides, tmp_path / "worker.log").start()
    try:
        worker.wait_healthy()
        _kcat_produce(kcat, kafka_cfg, [b"A|" + _event("A", "i1", 1), b"A|" + _event("A", "i2", 2), b"A|" + big,
                                        bad_key + b"|" + _event("A", "i4", 4)])
        time.sleep(8)
        _kcat_produce(kcat, kafka_cfg, [b"B|" + _event("B", "i5", 5)])
        t0 = time.monotonic()
        recs = recommendations(kafka_cfg, expect=3, timeout_s=30)
        waited = time.monotonic() - t0
        time.sleep(3)  # a worker stuck retrying would emit user A's recommendations again meanwhile
        recs = recommendations(kafka_cfg, expect=len(recs), timeout_s=10)
        dlq = read_topic(kafka_cfg, kafka_cfg.topics.dlq, expect=2, timeout_s=30)
        originals = read_topic(kafka_cfg, kafka_cfg.topics.interactions, expect=5, timeout_s=30)
        health = worker.health()
    finally:
        worker.stop()
    print(f"\nB served {waited:.1f} s after it was produced; {len(recs)} recommendations, {len(dlq)} dead letters")
    assert sorted((r["user_id"], r["source"]["offset"]) for r in recs) == sorted(
        (json.loads(m.value())["user_id"], m.offset()) for m in originals
        if m.key() in (b"A", b"B") and len(m.value()) < 1000), "exactly one recommendation per good event"
    assert health["status"] == "ok", health
    by_key = {m.key(): m for m in dlq}
    assert len(dlq) == 2 and set(by_key) == {b"A", bad_key}
    headers = dict(by_key[b"A"].headers())
    assert headers["lrustream.reason"].decode().startswith("oversized value")
    assert headers["lrustream.truncated"] == b"true"
    assert int(headers["lrustream.original.size"]) == len(big)
    assert headers["lrustream.original.sha256"].decode() == hashlib.sha256(big).hexdigest()
    assert big.startswith(by_key[b"A"].value()) and len(by_key[b"A"].value()) < len(big)
    assert dict(by_key[bad_key].headers())["lrustream.reason"] == b"key is not UTF-8"
    original_ts = {(m.partition(), m.offset()): m.timestamp()[1] for m in originals}
    for msg in dlq:  # the evidence travels: the original record's timestamp
        h = dict(msg.headers())
        assert msg.timestamp()[1] == original_ts[(int(h["lrustream.source.partition"]),
                                                   int(h["lrustream.source.offset"]))]
