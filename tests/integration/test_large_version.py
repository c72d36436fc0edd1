"""A large model version through Kafka (stream/versions.py) on the real broker: a 200,000-item LRURec (d=64, about
52 MB of weights, a hundred chunks) published by one host reaches a running worker that shares nothing with it
but the broker, arrives bit for bit, and the worker swaps to it and recommends with it, then builds the version's
approximate index beside serving and says what came of it."""

from __future__ import annotations

import time
from pathlib import Path

from lrustream.kernel.config import Config
from models.store import META, VOCAB, WEIGHTS, ModelStore
from stream.topics import create_topics
from stream.versions import VersionLog
from tests.streamkit import WorkerProcess, produce_events, recommendations, ring_stream, small_model, wait_for_version

ITEMS = 200_000


def _index_outcome(log: Path, version: str, timeout_s: float) -> bool:
    """Wait for the worker to say what came of the version's approximate index (stream/retrieval.py), built after
    the swap, beside serving: True when it ranks through it, False when the index was slower than exact ranking."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if f"version {version} ranks through an approximate index" in text:
            return True
        if f"version {version} stays ranked exactly" in text:
            return False
        time.sleep(0.5)
    raise AssertionError(f"no word of version {version}'s approximate index within {timeout_s:.0f} s")


def test_a_200k_item_version_round_trips_and_a_running_worker_serves_it(kafka_cfg: Config,
                                                                          kafka_overrides: list[str],
                                                                          tmp_path: Path) -> None:
    create_topics(kafka_cfg)
    worker_dirs = [f"state.dir={tmp_path / 'worker' / 'state'}", f"model_store.dir={tmp_path / 'worker' / 'models'}",
                   "stream.unknown_items=oov"]
    publisher = VersionLog(kafka_cfg, ModelStore(tmp_path / "publisher"))
    worker = WorkerProcess([*kafka_overrides, *worker_dirs], tmp_path / "worker.log")
    try:
        first = publisher.publish(*small_model(kafka_cfg, num_items=40, d_model=64)).version
        assert worker.start().wait_healthy()["model_version"] == first
        model, vocab = small_model(kafka_cfg, num_items=ITEMS, seed=1, d_model=64)
        t0 = time.monotonic()
        large = publisher.publish(model, vocab).version
        t1 = time.monotonic()
        wait_for_version(worker, large, timeout_s=60.0)
        print(f"\n{ITEMS:,} items x 64: published in {t1 - t0:.2f} s, served by the worker "
              f"{time.monotonic() - t0:.2f} s after the publish started")
        events = ring_stream(20, 100, items=ITEMS, seed=3)
        produce_events(kafka_cfg, events)
        recs = recommendations(kafka_cfg, expect=len(events))
        indexed = _index_outcome(tmp_path / "worker.log", large, timeout_s=120.0)
        if indexed:  # ranked through the index from then on: the recall it was built with is in the metrics
            recall = [line for line in worker.get("/metrics").decode().splitlines()
                      if line.startswith(f'lrustream_worker_index_recall{{version="{large}"}}')]
            assert recall and float(recall[0].split()[-1]) >= kafka_cfg.stream.approximate_recall
    finally:
        worker.stop()
        publisher.close()
    sent = publisher.store.versions_dir / large
    got = tmp_path / "worker" / "models" / "versions" / large
    assert (sent / WEIGHTS).stat().st_size > 50_000_000
    for name in (META, VOCAB, WEIGHTS):
        assert (got / name).read_bytes() == (sent / name).read_bytes(), name
    assert len(recs) == len(events) and {r["model_version"] for r in recs} == {large}
    known = set(vocab.items())
    assert all(r["items"] and set(r["items"]) <= known for r in recs)
    assert any(int(item[1:]) > 40 for r in recs for item in r["items"]), "items only the large version knows"
