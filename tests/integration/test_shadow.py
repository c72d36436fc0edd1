"""Shadow scoring on real Kafka: an operator shadows a candidate version; the worker's /metrics give
both versions' prequential hit rates over the same events, each what that version would have scored alone, while
every recommendation still comes from the serving version, as without a shadow."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from typer.testing import CliRunner

from lrustream.cli import app
from lrustream.kernel.config import Config
from stream.topics import create_topics
from tests.integration.test_worker import assert_matches_reference
from tests.streamkit import WorkerProcess, produce_events, publish_model, recommendations, reference, ring_stream


def _prequential_hits(events: list[tuple[str, str]], recs_per_user: dict[str, list[list[str]]]) -> tuple[int, int]:
    """(events with an earlier event of their user, those whose item was in the recommendation after it)."""
    seen: dict[str, int] = {}
    counted = hits = 0
    for user, item in events:
        k = seen.get(user, 0)
        if k:
            counted += 1
            hits += item in recs_per_user[user][k - 1]
        seen[user] = k + 1
    return counted, hits


def _shadow_metrics(worker: WorkerProcess) -> dict[str, float]:
    text = worker.get("/metrics").decode()
    rates = re.findall(r'lrustream_shadow_hit_rate\{role="(\w+)",version="\w+"\} (\S+)', text)
    out = {role: float(value) for role, value in rates}
    events = re.findall(r"lrustream_shadow_events\{[^}]*\} (\S+)", text)
    out["events"] = float(events[0]) if events else 0.0
    return out


def test_both_versions_hit_rates_over_the_same_events_and_the_output_unchanged(
        kafka_cfg: Config, kafka_overrides: list[str], tmp_path: Path) -> None:
    create_topics(kafka_cfg)
    v1 = publish_model(kafka_cfg, seed=0)
    assert CliRunner().invoke(app, ["models", "pin", v1, *kafka_overrides]).exit_code == 0
    v2 = publish_model(kafka_cfg, seed=1)  # published while v1 is pinned: a candidate nobody serves
    worker = WorkerProcess(kafka_overrides, tmp_path / "worker.log").start()
    try:
        worker.wait_healthy()
        out = CliRunner().invoke(app, ["models", "shadow", v2, *kafka_overrides])
        assert out.exit_code == 0, out.output
        deadline = time.monotonic() + 15
        while json.loads(worker.get("/model"))["shadow"] != v2:
            assert time.monotonic() < deadline, "the worker did not start shadowing"
            time.sleep(0.2)

        events = ring_stream(users=8, events=240, items=40, step=3)
        produce_events(kafka_cfg, events)
        recs = recommendations(kafka_cfg, expect=len(events))
        assert {r["model_version"] for r in recs} == {v1}
        serving_alone, candidate_alone = reference(kafka_cfg, events, version=v1), reference(kafka_cfg, events,
                                                                                              version=v2)
        assert_matches_reference(recs, serving_alone)  # the output is what v1 gives without a shadow
        counted, serving_hits = _prequential_hits(events, {u: [i for i, _ in r["recs"]]
                                                           for u, r in serving_alone.items()})
        _, shadow_hits = _prequential_hits(events, {u: [i for i, _ in r["recs"]] for u, r in candidate_alone.items()})
        deadline = time.monotonic() + 10
        while (metrics := _shadow_metrics(worker))["events"] < counted:
            assert time.monotonic() < deadline, metrics
            time.sleep(0.2)
        assert metrics == {"events": counted, "serving": serving_hits / counted, "shadow": shadow_hits / counted}
        assert serving_hits > 0 and shadow_hits > 0  # the events let both versions hit

        assert CliRunner().invoke(app, ["models", "unshadow", *kafka_overrides]).exit_code == 0
        deadline = time.monotonic() + 15
        while json.loads(worker.get("/model"))["shadow"] is not None:
            assert time.monotonic() < deadline, "the worker did not stop shadowing"
            time.sleep(0.2)
        assert _shadow_metrics(worker) == {"events": 0.0}
    finally:
        worker.stop()
