"""Shadow scoring (stream/shadow.py) without Kafka: both versions' prequential hits over the same events, each
equal to what that version, serving alone, would have emitted; the output unchanged; a failing candidate stops
shadowing, never the batch."""

from __future__ import annotations

import json
from pathlib import Path

from lrustream.kernel.config import load_config
from models.store import ModelStore
from state.store import StateStore
from stream.processor import Processor
from stream.serving import Serving
from tests.streamkit import build_processor, publish_model, ring_stream
from tests.unit.stream.test_processor import RecordingProducer, _event, _sent

USERS, EVENTS, BATCH = 6, 96, 16


def _versions(tmp_path: Path) -> tuple[ModelStore, str, str]:
    cfg = load_config(overrides=[f"model_store.dir={tmp_path / 'models'}"])
    v1, v2 = publish_model(cfg, seed=0, local=True), publish_model(cfg, seed=1, local=True)
    return ModelStore(cfg.model_store.dir), v1, v2


def _run(tmp_path: Path, name: str, serving: Serving, shadow: Serving | None = None) -> tuple[Processor, list[dict]]:
    cfg = load_config(overrides=[f"model_store.dir={tmp_path / 'models'}"])
    processor = build_processor(cfg, serving, StateStore(tmp_path / name), RecordingProducer())
    processor.set_shadow(shadow)
    events = [_event(u, i, k) for k, (u, i) in enumerate(ring_stream(USERS, EVENTS, items=40, step=3))]
    for start in range(0, len(events), BATCH):
        processor.apply(events[start:start + BATCH])
        if start % (2 * BATCH) == 0:
            processor.commit()  # later batches read some users from the store, others from pending records
    processor.commit()
    recs = [json.loads(r["value"]) for r in _sent(processor.producer, cfg.topics.recommendations)]
    return processor, recs


def _hits_of(recs: list[dict]) -> tuple[int, int]:
    """(events with an earlier event of their user, those whose item was in the recommendation after it)."""
    previous: dict[str, list[str]] = {}
    counted = hits = 0
    events = ring_stream(USERS, EVENTS, items=40, step=3)
    by_offset = {r["source"]["offset"]: r for r in recs}
    for offset, (user, item) in enumerate(events):
        if user in previous:
            counted += 1
            hits += item in previous[user]
        previous[user] = by_offset[offset]["items"]
    return counted, hits


def test_shadow_scoring_counts_both_versions_over_the_same_events_and_leaves_the_output_unchanged(
        tmp_path: Path) -> None:
    store, v1, v2 = _versions(tmp_path)
    _, alone = _run(tmp_path, "alone", Serving.load(store, v1))
    shadowed, with_shadow = _run(tmp_path, "shadowed", Serving.load(store, v1), Serving.load(store, v2))
    _, candidate_alone = _run(tmp_path, "candidate", Serving.load(store, v2))

    def output(recs: list[dict]) -> list[tuple]:
        return [(r["user_id"], r["items"], r["scores"], r["model_version"], r["source"]) for r in recs]

    assert output(with_shadow) == output(alone)
    tally = shadowed.shadow.tally
    counted, serving_hits = _hits_of(alone)
    assert (tally.serving, tally.shadow, tally.events, tally.serving_hits) == (v1, v2, counted, serving_hits)
    assert (counted, tally.shadow_hits) == _hits_of(candidate_alone)
    assert counted == EVENTS - USERS and serving_hits > 0 and tally.shadow_hits > 0
    rates = {s.labels["role"]: s.value for m in shadowed.metrics.registry.collect()
             if m.name == "lrustream_shadow_hit_rate" for s in m.samples}
    assert rates == {"serving": serving_hits / counted, "shadow": tally.shadow_hits / counted}


def test_a_candidate_that_fails_stops_shadowing_and_the_batch_is_served_as_without_it(tmp_path: Path) -> None:
    store, v1, v2 = _versions(tmp_path)
    _, alone = _run(tmp_path, "alone", Serving.load(store, v1))
    broken = Serving.load(store, v2)
    broken.model.steps = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    shadowed, recs = _run(tmp_path, "shadowed", Serving.load(store, v1), broken)
    assert shadowed.shadow is None
    assert [(r["items"], r["scores"]) for r in recs] == [(r["items"], r["scores"]) for r in alone]
