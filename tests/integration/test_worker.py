"""The real-time path on real Kafka: one recommendation per event, equal to offline sequential serving;
crash (SIGKILL) and rebalance safety; bad input to the dead-letter topic."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lrustream.children import parse_histograms
from lrustream.kernel.config import Config, load_config
from stream.topics import create_topics
from tests.streamkit import (
    WorkerProcess,
    end_offsets,
    event_value,
    produce,
    produce_events,
    produce_paced,
    publish_model,
    read_topic,
    recommendations,
    reference,
    stored_states,
    synthetic_events,
)


def assert_matches_reference(recs: list[dict], ref: dict[str, dict]) -> None:
    """Each user's recommendations, in source-offset order, equal offline sequential serving."""
    by_user: dict[str, list[dict]] = {}
    for rec in sorted(recs, key=lambda r: (r["source"]["partition"], r["source"]["offset"])):
        by_user.setdefault(rec["user_id"], []).append(rec)
    assert set(by_user) == set(ref)
    for user, got in by_user.items():
        want = ref[user]["recs"]
        assert len(got) == len(want), user
        for rec, (items, scores) in zip(got, want, strict=True):
            assert rec["items"] == items
            np.testing.assert_allclose(rec["scores"], scores, atol=1e-4)


@pytest.fixture
def worker_log(tmp_path: Path) -> Path:
    return tmp_path / "worker.log"


def test_each_event_yields_one_recommendation_equal_to_sequential_step(kafka_cfg: Config, kafka_overrides: list[str],
                                                                       worker_log: Path) -> None:
    create_topics(kafka_cfg)
    version = publish_model(kafka_cfg)
    events = synthetic_events(600, users=25)
    produce_events(kafka_cfg, events)
    worker = WorkerProcess(kafka_overrides, worker_log).start(["stream.batch_size=64"])
    try:
        health = worker.wait_healthy()
        assert health["model_version"] == version
        recs = recommendations(kafka_cfg, expect=len(events))
        metrics = worker.get("/metrics").decode()
    finally:
        worker.stop()
    assert len(recs) == len(events)
    assert len({(r["source"]["partition"], r["source"]["offset"]) for r in recs}) == len(events)
    assert {r["model_version"] for r in recs} == {version}
    ref = reference(kafka_cfg, events)
    assert_matches_reference(recs, ref)
    for user, (state, _) in stored_states(kafka_cfg, set(ref)).items():
        np.testing.assert_allclose(np.frombuffer(state, np.float32), np.frombuffer(ref[user]["state"], np.float32),
                                   atol=1e-5)
    assert "lrustream_recommendations_total 600.0" in metrics
    from typer.testing import CliRunner

    from lrustream.cli import app

    out = CliRunner().invoke(app, ["state", "inspect", "u0", *kafka_overrides])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert shown["window"] == [f"i{i}" for i in ref["u0"]["window"]] and shown["model_version"] == version
    assert "lrustream_event_to_recommendation_seconds_bucket" in metrics
    assert "lrustream_commit_seconds_count" in metrics and "lrustream_commit_seconds_count 0.0" not in metrics
    acked = parse_histograms(metrics)["lrustream_recommendation_ack_seconds"][-1][1]  # reported at the next poll
    assert 0 < acked <= len(events)


def test_sigkill_mid_stream_loses_nothing_and_applies_nothing_twice(kafka_cfg: Config, kafka_overrides: list[str],
                                                                    worker_log: Path, tmp_path: Path) -> None:
    create_topics(kafka_cfg)
    publish_model(kafka_cfg)
    events = synthetic_events(4000, users=60, seed=2)
    produce_events(kafka_cfg, events[:1000])
    worker = WorkerProcess(kafka_overrides, worker_log).start(["stream.batch_size=32"])
    worker.wait_healthy()
    # the rest at 50/s until both kills are done, so that they land mid-stream however fast the worker drains or
    # slowly it restarts (a faster worker once served every event before the second kill; then a CI run's
    # restarts outlasted 20 s of paced events), then at once
    kills_done = threading.Event()
    flowing = threading.Thread(target=produce_paced, args=(kafka_cfg, events[1000:], 50.0, 1000, kills_done),
                               daemon=True)
    flowing.start()
    kills = 0
    emitted_at_kill = []
    try:
        for _ in range(2):  # kill while recommendations are flowing, then restart
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and worker.get_metric("lrustream_recommendations_total") < 300:
                time.sleep(0.2)
            worker.kill()
            kills += 1
            emitted_at_kill.append(sum(end_offsets(kafka_cfg, kafka_cfg.topics.recommendations).values()))
            worker.start(["stream.batch_size=32"])
            worker.wait_healthy()
        kills_done.set()
        flowing.join(timeout=60)
        recs = recommendations(kafka_cfg, expect=len(events), timeout_s=180)
    finally:
        worker.stop()
    sources = {(r["source"]["partition"], r["source"]["offset"]) for r in recs}
    assert all(300 <= n < len(events) for n in emitted_at_kill), f"kills landed mid-stream: {emitted_at_kill}"
    assert len(sources) == len(events), "an event produced no recommendation"
    print(f"\n{kills} kills: {len(recs)} records for {len(events)} events ({len(recs) - len(sources)} duplicates)")
    ref = reference(kafka_cfg, events)
    for user, (state, _) in stored_states(kafka_cfg, set(ref)).items():
        np.testing.assert_allclose(np.frombuffer(state, np.float32), np.frombuffer(ref[user]["state"], np.float32),
                                   atol=1e-5, err_msg=user)
    # an uninterrupted run of a second worker group over the same input ends in bit-identical states
    clean = [o for o in kafka_overrides if not o.startswith(("stream.app_id", "topics.recommendations",
                                                              "topics.state_changelog", "state.dir"))]
    clean += [f"stream.app_id={kafka_cfg.stream.app_id}-clean", f"state.dir={tmp_path / 'clean'}",
              f"topics.recommendations={kafka_cfg.topics.recommendations}-clean",
              f"topics.state_changelog={kafka_cfg.topics.state_changelog}-clean"]
    clean_cfg = load_config(overrides=clean)
    other = WorkerProcess(clean, tmp_path / "clean.log").start(["stream.batch_size=32"])
    try:
        other.wait_healthy()
        recommendations(clean_cfg, expect=len(events), timeout_s=180)
    finally:
        other.stop()
    assert stored_states(kafka_cfg, set(ref)) == stored_states(clean_cfg, set(ref))


def test_second_worker_takes_over_users_with_correct_states(kafka_cfg: Config, kafka_overrides: list[str],
                                                            tmp_path: Path) -> None:
    create_topics(kafka_cfg)
    publish_model(kafka_cfg)
    events = synthetic_events(1200, users=40, seed=3)
    first, second = events[:600], events[600:]
    a = WorkerProcess([*kafka_overrides, f"state.dir={tmp_path / 'a'}"], tmp_path / "a.log").start()
    b = WorkerProcess([*kafka_overrides, f"state.dir={tmp_path / 'b'}"], tmp_path / "b.log").start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the group has settled when each owns one of the two partitions
            if a.wait_healthy()["partitions"] and b.wait_healthy()["partitions"]:
                break
            time.sleep(0.5)
        assert sorted(a.wait_healthy()["partitions"] + b.wait_healthy()["partitions"]) == [0, 1]
        produce_events(kafka_cfg, first)
        recommendations(kafka_cfg, expect=len(first))
        served_a = a.get_metric("lrustream_recommendations_total")
        served_b = b.get_metric("lrustream_recommendations_total")
        assert served_a > 0 and served_b > 0, "both workers of the group should own partitions"
        b.stop()
        produce_events(kafka_cfg, second, ts0=1_800_000_000_000)
        recs = recommendations(kafka_cfg, expect=len(events), timeout_s=120)
    finally:
        a.stop()
        b.stop()
    assert len({(r["source"]["partition"], r["source"]["offset"]) for r in recs}) == len(events)
    ref = reference(kafka_cfg, events)
    assert_matches_reference(_dedupe(recs), ref)
    cfg_a = load_config(overrides=[*kafka_overrides, f"state.dir={tmp_path / 'a'}"])
    for user, (state, _) in stored_states(cfg_a, set(ref)).items():
        np.testing.assert_allclose(np.frombuffer(state, np.float32), np.frombuffer(ref[user]["state"], np.float32),
                                   atol=1e-5, err_msg=user)


def test_malformed_events_go_to_dlq_and_good_ones_around_them_are_served(kafka_cfg: Config,
                                                                          kafka_overrides: list[str],
                                                                          worker_log: Path) -> None:
    create_topics(kafka_cfg)
    publish_model(kafka_cfg)
    good = synthetic_events(200, users=10, seed=4)
    bad = [(b"u1", b"{not json"), (b"u2", b"[1, 2]"), (b"u3", json.dumps({"user_id": "u3"}).encode()),
           (b"u4", json.dumps({"user_id": "u4", "item_id": 1.5, "ts": 1}).encode()),
           (b"u5", b"x" * 70_000), (b"u6", None), (b"u7", event_value("u7", "no-such-item", 5)),
           (b"u8", event_value("someone-else", "i1", 5))]
    mixed: list[tuple[bytes | None, bytes | None]] = []
    for k, (u, i) in enumerate(good):
        mixed.append((u.encode(), event_value(u, i, 1_700_000_000_000 + k)))
        if k % 25 == 0:
            mixed.append(bad[(k // 25) % len(bad)])
    produce(kafka_cfg, mixed)
    worker = WorkerProcess(kafka_overrides, worker_log).start()
    try:
        worker.wait_healthy()
        recs = recommendations(kafka_cfg, expect=len(good))
        dlq = read_topic(kafka_cfg, kafka_cfg.topics.dlq, expect=len(bad))
        assert worker.health()["status"] == "ok"
    finally:
        worker.stop()
    assert_matches_reference(recs, reference(kafka_cfg, good))
    reasons = sorted(dict(m.headers())["lrustream.reason"].decode().split(":")[0] for m in dlq)
    assert len(dlq) == len(bad)
    assert reasons == sorted(["malformed JSON", "not a JSON object", "missing field item_id", "wrong type for item_id",
                              "oversized value", "empty value", "unknown item", "key does not match user_id"])
    assert sorted(m.value() or b"" for m in dlq) == sorted(v or b"" for _, v in bad), "original bytes kept"


def _dedupe(recs: list[dict]) -> list[dict]:
    """How a consumer de-duplicates: keep the first record per (source partition, source offset)."""
    seen, out = set(), []
    for r in recs:
        key = (r["source"]["partition"], r["source"]["offset"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out






def test_state_changing_endpoint_requires_the_configured_token(kafka_cfg: Config, kafka_overrides: list[str],
                                                               worker_log: Path) -> None:
    import urllib.error
    import urllib.request

    create_topics(kafka_cfg)
    publish_model(kafka_cfg)
    worker = WorkerProcess([*kafka_overrides, "http.token=s3cret"], worker_log).start()

    def post(token: str | None) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{worker.port}/refresh", method="POST", data=b"")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        worker.wait_healthy()
        assert worker.health()["status"] == "ok", "read-only endpoints need no token"
        assert post(None) == 401 and post("wrong") == 401
        assert post("s3cret") == 202
        requests = read_topic(kafka_cfg, kafka_cfg.topics.model_updates, expect=1)
    finally:
        worker.stop()
    assert [json.loads(m.value())["request"] for m in requests] == ["refresh"]
    assert "s3cret" not in worker_log.read_text(), "the token is never logged"


def _recreate_input_topic(cfg: Config) -> None:
    from confluent_kafka.admin import AdminClient

    from lrustream.kernel.kafka import librdkafka_config

    admin = AdminClient(librdkafka_config(cfg))
    admin.delete_topics([cfg.topics.interactions], operation_timeout=30)[cfg.topics.interactions].result()
    deadline = time.monotonic() + 60
    while True:  # the broker refuses to create a topic still marked for deletion
        try:
            create_topics(cfg)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_recreated_input_topic_starts_its_partitions_from_scratch_instead_of_skipping_its_events(
        kafka_cfg: Config, kafka_overrides: list[str], worker_log: Path) -> None:
    """Offsets of a re-created topic start at 0 again: the old applied marker must not make the worker skip
    every event below it. The states start from scratch, and the log says so."""
    create_topics(kafka_cfg)
    publish_model(kafka_cfg)
    before = synthetic_events(300, users=12, seed=11)
    produce_events(kafka_cfg, before)
    worker = WorkerProcess(kafka_overrides, worker_log).start()
    try:
        worker.wait_healthy()
        recommendations(kafka_cfg, expect=len(before))
    finally:
        worker.stop()
    _recreate_input_topic(kafka_cfg)
    after = synthetic_events(120, users=12, seed=12)
    produce_events(kafka_cfg, after, ts0=1_800_000_000_000)
    worker.start()
    try:
        worker.wait_healthy()
        recs = recommendations(kafka_cfg, expect=len(before) + len(after), timeout_s=60)
    finally:
        worker.stop()
    new = _dedupe([r for r in recs if r["event_ts"] >= 1_800_000_000_000])
    assert len(new) == len(after), "every event of the re-created topic served"
    assert_matches_reference(new, reference(kafka_cfg, after))  # from scratch: as if the old events never were
    assert "input topic was re-created" in worker_log.read_text()


def test_idle_states_expire_after_the_ttl_through_the_changelog(kafka_cfg: Config, kafka_overrides: list[str],
                                                                worker_log: Path) -> None:
    """state.ttl_days: states idle longer are deleted, even while no event arrives, with a changelog tombstone
    (so the expiry survives a restore), and the user's next event starts from a fresh state."""
    create_topics(kafka_cfg)
    publish_model(kafka_cfg)
    worker = WorkerProcess(kafka_overrides, worker_log).start(["state.ttl_days=0.0000347"])  # 3 s
    try:
        worker.wait_healthy()
        produce_events(kafka_cfg, [("uA", "i1"), ("uA", "i2"), ("uB", "i3")])
        recommendations(kafka_cfg, expect=3)
        deadline = time.monotonic() + 30  # no more events: the housekeeping timer expires them
        while worker.get_metric("lrustream_expired_states_total") < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        expired = worker.get_metric("lrustream_expired_states_total")
        produce_events(kafka_cfg, [("uA", "i5")], ts0=1_900_000_000_000)
        recs = recommendations(kafka_cfg, expect=4)
    finally:
        worker.stop()
    assert expired >= 2, "uA and uB expired"
    tombstones = {m.key() for m in read_topic(kafka_cfg, kafka_cfg.topics.state_changelog) if m.value() is None}
    assert {b"u:uA", b"u:uB"} <= tombstones
    [again] = [r for r in recs if r["event_ts"] == 1_900_000_000_000]
    assert again["items"] == reference(kafka_cfg, [("uA", "i5")])["uA"]["recs"][0][0], "a fresh state"
