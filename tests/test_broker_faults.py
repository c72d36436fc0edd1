"""Broker faults: the broker is stopped and restarted mid-stream; the worker reconnects and continues with no
lost and no twice-applied event. Uses a broker of its own (the test stops it)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from lrustream.broker import LocalBroker, free_port
from lrustream.config import load_config
from stream.topics import create_topics
from tests.conftest import JARS_DIR
from tests.streamkit import WorkerProcess, publish_model, recommendations, reference
from tests.test_worker import produce_events, stored_states, synthetic_events

pytestmark = pytest.mark.kafka


def test_broker_restart_mid_stream_loses_nothing_and_applies_nothing_twice(kafka_overrides: list[str],
                                                                           tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path / "kafka", JARS_DIR, port=free_port(), controller_port=free_port())
    broker.start()
    overrides = [o for o in kafka_overrides if not o.startswith("kafka.bootstrap_servers=")]
    overrides.append(f"kafka.bootstrap_servers={broker.bootstrap}")
    cfg = load_config(overrides=overrides)
    worker = WorkerProcess([*overrides, "stream.batch_size=32"], tmp_path / "worker.log")
    try:
        create_topics(cfg)
        publish_model(cfg)
        events = synthetic_events(3000, users=50, seed=9)
        produce_events(cfg, events)
        worker.start()
        worker.wait_healthy()
        deadline = time.monotonic() + 60
        while worker.get_metric("lrustream_recommendations_total") < 300 and time.monotonic() < deadline:
            time.sleep(0.1)
        served_before = worker.get_metric("lrustream_recommendations_total")
        broker.stop()
        time.sleep(5)  # the worker keeps running without a broker, retrying
        assert worker.proc is not None and worker.proc.poll() is None, "the worker survived the outage"
        broker.start()
        recs = recommendations(cfg, expect=len(events), timeout_s=240)
    finally:
        worker.stop()
        broker.stop()
    assert 0 < served_before < len(events), "the outage happened mid-stream"
    assert len({(r["source"]["partition"], r["source"]["offset"]) for r in recs}) == len(events)
    ref = reference(cfg, events)
    for user, (state, _) in stored_states(cfg, set(ref)).items():
        np.testing.assert_allclose(np.frombuffer(state, np.float32), np.frombuffer(ref[user]["state"], np.float32),
                                   atol=1e-5, err_msg=user)
