"""Catalogue control on real Kafka: an item blocked through the items topic leaves every emitted
recommendation within seconds, comes back after unblock, and stays blocked across a worker restart."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from typer.testing import CliRunner

from lrustream.cli import app
from lrustream.kernel.config import Config
from stream.topics import create_topics
from tests.streamkit import WorkerProcess, produce_events, publish_model, recommendations, synthetic_events

APPLIED_WITHIN_MS = 5_000  # stream/README.md's bound: from the control record to the last recommendation holding it


def _items(args: list[str], overrides: list[str]) -> str:
    out = CliRunner().invoke(app, ["items", *args, *overrides])
    assert out.exit_code == 0, out.output
    return out.output


def _emitted_after(recs: list[dict], since_ms: float) -> list[dict]:
    return [r for r in recs if r["emitted_ts"] >= since_ms]


def test_a_blocked_item_leaves_every_recommendation_within_seconds_comes_back_after_unblock_and_survives_a_restart(
        kafka_cfg: Config, kafka_overrides: list[str], tmp_path: Path) -> None:
    create_topics(kafka_cfg)
    publish_model(kafka_cfg)
    worker = WorkerProcess(kafka_overrides, tmp_path / "worker.log").start()
    sent = 0

    def send(seed: int, n: int = 300) -> list[dict]:
        nonlocal sent
        produce_events(kafka_cfg, synthetic_events(n, users=20, seed=seed), ts0=1_700_000_000_000 + sent)
        sent += n
        return recommendations(kafka_cfg, expect=sent)

    try:
        worker.wait_healthy()
        recs = send(seed=1)
        target, times = Counter(i for r in recs for i in r["items"]).most_common(1)[0]
        assert times > 30, "the test needs an item the model recommends often"

        _items(["block", target], kafka_overrides)
        blocked_ms = time.time() * 1000
        time.sleep(APPLIED_WITHIN_MS / 1000)
        late = _emitted_after(send(seed=2), blocked_ms + APPLIED_WITHIN_MS)
        assert len(late) == 300 and not [r for r in late if target in r["items"]]
        assert _items(["list"], kafka_overrides).split() == [target]
        assert json.loads(_items(["list", "--json"], kafka_overrides))["blocked"] == [target]
        assert worker.get_metric("lrustream_blocked_items") == 1.0

        _items(["unblock", target], kafka_overrides)
        unblocked_ms = time.time() * 1000
        time.sleep(APPLIED_WITHIN_MS / 1000)
        late = _emitted_after(send(seed=3), unblocked_ms + APPLIED_WITHIN_MS)
        assert len(late) == 300 and [r for r in late if target in r["items"]], "the unblocked item came back"
        assert _items(["list"], kafka_overrides).split() == []

        _items(["block", target], kafka_overrides)
        worker.stop()  # a worker that starts reads the items topic to its end before its first event
        worker = WorkerProcess(kafka_overrides, tmp_path / "worker2.log").start()
        worker.wait_healthy()
        newest = sorted(send(seed=4), key=lambda r: r["emitted_ts"])[-300:]
        assert not [r for r in newest if target in r["items"]]
    finally:
        worker.stop()
