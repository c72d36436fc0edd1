"""Bad input at scale, on real Kafka: 10,000 malformed records (random bytes, truncated JSON, huge payloads,
wrong types, absurd timestamps, unicode and very long ids, wrong keys) mixed with good events. The worker
never crashes, every bad record lands in the dead-letter topic with its reason, every good event is served."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lrustream.config import Config
from stream.events import BadEvent, parse_event
from stream.topics import create_topics
from tests.streamkit import WorkerProcess, produce, publish_model, read_topic, recommendations

pytestmark = pytest.mark.kafka

N_BAD = 10_000
UNICODE = "λ→😀中\u202e\u00e9ß\U0001f600"


def _good(rng: random.Random, k: int) -> tuple[bytes, bytes]:
    user = f"u{rng.randrange(40)}"
    return user.encode(), json.dumps({"user_id": user, "item_id": f"i{rng.randint(1, 40)}", "ts": 10**12 + k}).encode()


def _bad(rng: random.Random) -> tuple[bytes | None, bytes | None]:
    user = f"u{rng.randrange(40)}"
    good = {"user_id": user, "item_id": f"i{rng.randint(1, 40)}", "ts": 10**12}
    kind = rng.randrange(10)
    if kind == 0:  # random bytes
        return user.encode(), rng.randbytes(rng.randint(0, 300))
    if kind == 1:  # truncated JSON
        text = json.dumps(good).encode()
        return user.encode(), text[: rng.randint(0, len(text) - 1)]
    if kind == 2 and rng.random() < 0.01:  # huge payloads (a few: they are big)
        return user.encode(), json.dumps({**good, "pad": "x" * 70_000}).encode()
    if kind == 3:  # wrong types
        field = rng.choice(["user_id", "item_id", "ts"])
        value = rng.choice([1.5, True, None, [1], {"a": 1}, "12" if field == "ts" else 3.0])
        return user.encode(), json.dumps({**good, field: value}).encode()
    if kind == 4:  # negative or absurd timestamps
        return user.encode(), json.dumps({**good, "ts": rng.choice([-1, -(10**15), 10**20, 2**63, 10**400])}).encode()
    if kind == 5:  # very long ids
        long_id = "u" * rng.randint(257, 5000)
        return long_id.encode(), json.dumps({**good, "user_id": long_id}).encode()
    if kind == 6:  # unicode ids: valid users, but items nobody knows (unknown item under the strict policy)
        uid = "".join(rng.choice(UNICODE) for _ in range(rng.randint(1, 8)))
        return uid.encode(), json.dumps({**good, "user_id": uid, "item_id": uid}, ensure_ascii=rng.random() < 0.5
                                        ).encode()
    if kind == 7:  # key does not match the user
        return rng.choice([b"someone-else", rng.randbytes(8)]), json.dumps(good).encode()
    if kind == 8:  # JSON that is not an object, or control characters in ids
        return user.encode(), rng.choice([b"[]", b"null", b'"s"', b"12", json.dumps({**good, "item_id": "i\x00"}
                                                                                        ).encode()])
    return user.encode(), rng.choice([b"", None])  # empty values


def test_ten_thousand_malformed_records_never_crash_the_worker(kafka_cfg: Config, kafka_overrides: list[str],
                                                               tmp_path: Path) -> None:
    create_topics(kafka_cfg)
    publish_model(kafka_cfg)
    rng = random.Random(2026)
    records: list[tuple[bytes | None, bytes | None]] = []
    expected_bad = 0
    good = 0
    while expected_bad < N_BAD:
        if rng.random() < 0.2:
            records.append(_good(rng, len(records)))
            good += 1
            continue
        key, value = _bad(rng)
        try:  # the generator can by chance produce a valid event; the contract decides, not the generator
            event = parse_event(value, key, 10**12)
            if event.item_id not in {f"i{k}" for k in range(1, 41)}:
                raise BadEvent("unknown item")
            good += 1
        except BadEvent:
            expected_bad += 1
        records.append((key, value))
    produce(kafka_cfg, records)
    worker = WorkerProcess(kafka_overrides, tmp_path / "worker.log").start()
    try:
        worker.wait_healthy()
        recs = recommendations(kafka_cfg, expect=good, timeout_s=180)
        dlq = read_topic(kafka_cfg, kafka_cfg.topics.dlq, expect=expected_bad, timeout_s=120)
        health = worker.wait_healthy()
        dlq_metric = worker.get_metric("lrustream_events_total")
    finally:
        worker.stop()
    assert health["status"] == "ok" and worker.proc is not None
    assert len({(r["source"]["partition"], r["source"]["offset"]) for r in recs}) == good, "every good event served"
    assert len(dlq) == expected_bad, "every bad record dead-lettered, once"
    assert all(dict(m.headers()).get("lrustream.reason") for m in dlq), "each with a reason"
    assert dlq_metric == len(records)
    print(f"\n{expected_bad} bad + {good} good records: {len(dlq)} dead-lettered, {len(recs)} served, 0 crashes")
