"""Bad input at scale, on real Kafka: 10,000 malformed records (random bytes, truncated JSON, payloads up to the
broker's record limit, wrong types, absurd timestamps, unicode and very long ids, wrong and non-UTF-8 keys,
headers) mixed with good events (some without key, with headers or repeated event ids). The worker never
crashes or stalls, every bad record lands in the dead-letter topic once with its reason, every good event is
served once."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lrustream.kernel.config import Config
from stream.topics import create_topics
from tests.streamkit import WorkerProcess, produce, publish_model, read_topic, recommendations

N_BAD = 10_000
UNICODE = "λ→😀中\u202e\u00e9ß\U0001f600"


BIG_BYTES = 1_000_000  # a value near the broker's 1 MiB record limit (its dead-letter copy is truncated)
Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]


def _bad(rng: random.Random) -> Record:
    """A record the contract refuses, by construction: the generator is the oracle (not parse_event, the code
    under test). Kinds that could come out valid by chance are built so that they cannot."""
    user = f"u{rng.randrange(40)}"
    good = {"user_id": user, "item_id": f"i{rng.randint(1, 40)}", "ts": 10**12}
    headers = [("h", rng.randbytes(rng.randint(0, 20)))] if rng.random() < 0.3 else None
    kind = rng.randrange(11)
    if kind == 0:  # random bytes, starting with a byte that never begins UTF-8
        return user.encode(), b"\xff" + rng.randbytes(rng.randint(0, 300)), headers
    if kind == 1:  # truncated JSON (a strict prefix of an object never parses)
        text = json.dumps(good).encode()
        return user.encode(), text[: rng.randint(0, len(text) - 1)], headers
    if kind == 2 and rng.random() < 0.02:  # huge payloads: over the input limit, a few up to the broker's
        size = BIG_BYTES if rng.random() < 0.1 else 70_000
        return user.encode(), json.dumps({**good, "pad": "x" * size}).encode(), headers
    if kind == 3:  # wrong types (null ts is not wrong: the Kafka timestamp stands in)
        field = rng.choice(["user_id", "item_id", "ts"])
        choices = [1.5, True, [1], {"a": 1}, "12" if field == "ts" else 3.0] + ([None] if field != "ts" else [])
        return user.encode(), json.dumps({**good, field: rng.choice(choices)}).encode(), headers
    if kind == 4:  # negative or absurd timestamps
        ts = rng.choice([-1, -(10**15), 10**20, 2**63, 10**400])
        return user.encode(), json.dumps({**good, "ts": ts}).encode(), headers
    if kind == 5:  # very long ids
        long_id = "u" * rng.randint(257, 5000)
        return long_id.encode(), json.dumps({**good, "user_id": long_id}).encode(), headers
    if kind == 6:  # unicode ids: valid users, but items nobody knows (unknown item under the strict policy)
        uid = "".join(rng.choice(UNICODE) for _ in range(rng.randint(1, 8)))
        value = json.dumps({**good, "user_id": uid, "item_id": uid}, ensure_ascii=rng.random() < 0.5)
        return uid.encode(), value.encode(), headers
    if kind == 7:  # key of someone else
        return b"someone-else", json.dumps(good).encode(), headers
    if kind == 8:  # key that is not UTF-8
        return b"\xfe" + rng.randbytes(rng.randint(0, 8)), json.dumps(good).encode(), headers
    if kind == 9:  # JSON that is not an object, or control characters in ids
        return user.encode(), rng.choice([b"[]", b"null", b'"s"', b"12", json.dumps({**good, "item_id": "i\x00"}
                                                                                    ).encode()]), headers
    return user.encode(), rng.choice([b"", None]), headers  # empty values


def _good(rng: random.Random, k: int) -> Record:
    """A valid event; some without key (accepted), with headers, or repeating another's event id."""
    user = f"u{rng.randrange(40)}"
    body = {"user_id": user, "item_id": f"i{rng.randint(1, 40)}", "ts": 10**12 + k}
    if rng.random() < 0.2:
        body["event_id"] = f"e{rng.randrange(50)}"  # duplicate event ids are the producer's business
    key = None if rng.random() < 0.05 else user.encode()
    headers = [("trace", str(k).encode()), ("empty", b"")] if rng.random() < 0.2 else None
    return key, json.dumps(body).encode(), headers


def test_ten_thousand_malformed_records_never_crash_the_worker(kafka_cfg: Config, kafka_overrides: list[str],
                                                               tmp_path: Path) -> None:
    create_topics(kafka_cfg)
    publish_model(kafka_cfg)
    rng = random.Random(2026)
    records: list[Record] = []
    bad_at: set[int] = set()
    while len(bad_at) < N_BAD:
        if rng.random() < 0.2:
            records.append(_good(rng, len(records)))
        else:
            bad_at.add(len(records))
            records.append(_bad(rng))
    good = len(records) - len(bad_at)
    produce(kafka_cfg, records)
    worker = WorkerProcess(kafka_overrides, tmp_path / "worker.log").start()
    try:
        worker.wait_healthy()
        recs = recommendations(kafka_cfg, expect=good, timeout_s=180)
        dlq = read_topic(kafka_cfg, kafka_cfg.topics.dlq, expect=len(bad_at), timeout_s=120)
        health = worker.health()
        events_metric = worker.get_metric("lrustream_events_total")
    finally:
        worker.stop()
    assert health["status"] == "ok" and worker.proc is not None, health
    assert len({(r["source"]["partition"], r["source"]["offset"]) for r in recs}) == good, "every good event served"
    assert len(recs) == good, "each once"
    assert len(dlq) == len(bad_at), "every bad record dead-lettered, once"
    assert all(dict(m.headers()).get("lrustream.reason") for m in dlq), "each with a reason"
    truncated = [m for m in dlq if dict(m.headers()).get("lrustream.truncated")]
    assert all(len(m.value() or b"") <= 65_536 for m in truncated)
    assert events_metric == len(records)
    print(f"\n{len(bad_at)} bad + {good} good records: {len(dlq)} dead-lettered ({len(truncated)} truncated), "
          f"{len(recs)} served, 0 crashes")
