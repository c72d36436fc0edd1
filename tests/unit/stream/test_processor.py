"""The micro-batch processor without Kafka (a recording producer, a local state store): cases that are hard
to reach through a running worker."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from confluent_kafka import KafkaError

from lrustream.kernel.config import StreamConfig, load_config
from models import LRURecConfig, build_model
from models.store import ModelStore
from models.vocab import Vocabulary
from state.store import StateStore
from stream.examples import decode_example
from stream.processor import DLQ_TRUNCATED_VALUE_BYTES, Input, OutputError, Processor, Stopping
from stream.serving import Serving
from tests.streamkit import build_processor, local_processor


class RecordingProducer:
    """Records what is produced; delivery reports come on flush, with the error ``fail`` gives a record (if any).
    ``pending`` makes flush report records outstanding for ever (a broker that does not answer)."""

    def __init__(self, fail=None, pending: bool = False) -> None:
        self.sent: list[tuple[str, bytes | None]] = []
        self.records: list[dict] = []
        self.fail = fail or (lambda record: None)
        self.pending = pending
        self._reports: list = []

    def produce(self, topic, value, key, headers=None, timestamp=0, on_delivery=None) -> None:
        record = {"topic": topic, "key": key, "value": value, "headers": headers, "timestamp": timestamp}
        self.sent.append((topic, value))
        self.records.append(record)
        if on_delivery is not None:
            self._reports.append((on_delivery, self.fail(record)))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        if self.pending:
            time.sleep(timeout)
            return len(self._reports)
        reports, self._reports = self._reports, []
        for on_delivery, err in reports:
            on_delivery(err, None)
        return 0


def _event(user: str, item: str, offset: int) -> Input:
    value = json.dumps({"user_id": user, "item_id": item, "ts": 1000 + offset}).encode()
    return Input(0, offset, user.encode(), value, 1000 + offset)


def test_rollback_to_a_smaller_vocabulary_rederives_states_holding_newer_items(tmp_path: Path) -> None:
    """v2 grew the vocabulary with an item first seen in the stream; a user's window holds its new id. After a
    rollback to v1 the state is re-derived from the window read with v2's vocabulary (the item becomes
    unknown to v1 and keeps its external id), instead of failing the batch for ever."""
    cfg = load_config(overrides=[f"model_store.dir={tmp_path / 'models'}"])
    store = ModelStore(cfg.model_store.dir)
    torch.manual_seed(0)
    model = build_model(LRURecConfig(d_model=16, num_layers=1, max_len=20), 40)
    v1 = store.publish(model, Vocabulary(f"i{k}" for k in range(1, 41))).version
    model.grow_items(41)
    v2 = store.publish(model, Vocabulary([*(f"i{k}" for k in range(1, 41)), "new-item"])).version
    producer = RecordingProducer()
    processor = build_processor(cfg, Serving.load(store, v2), StateStore(tmp_path / "state"), producer,
                                vocab_of=functools.lru_cache(maxsize=8)(store.vocabulary))
    processor.process([_event("u", "i3", 0), _event("u", "new-item", 1)])
    processor.swap(Serving.load(store, v1))
    result = processor.process([_event("u", "i5", 2)])
    assert result.served == 1 and result.rederived == 1
    record = processor.store.get(0, "u")
    assert record is not None and record.version == v1 and record.unknown == ["new-item"]
    assert [int(i) for i in record.window] == [3, -1, 5]
    recs = [json.loads(v) for t, v in producer.sent if t == cfg.topics.recommendations]
    assert [r["model_version"] for r in recs] == [v2, v2, v1]


def _processor(tmp_path: Path, producer: RecordingProducer, name: str = "state",
               stream: StreamConfig | None = None) -> tuple[Processor, object]:
    processor, cfg = local_processor(tmp_path, producer, name, stream)
    return processor, cfg.topics


def _sent(producer: RecordingProducer, topic: str) -> list[dict]:
    return [r for r in producer.records if r["topic"] == topic]


def test_an_event_whose_model_work_raises_is_dead_lettered_and_the_others_are_served_as_without_it(
        tmp_path: Path) -> None:
    events = [_event("u1", "i3", 0), _event("u2", "i7", 1), _event("u1", "i4", 2), _event("u3", "i5", 3),
              _event("u2", "i6", 4)]
    clean, _ = _processor(tmp_path, RecordingProducer(), "clean")
    clean.process([e for e in events if e.offset != 1])
    producer = RecordingProducer()
    processor, topics = _processor(tmp_path, producer)
    model, steps = processor.serving.model, processor.serving.model.steps

    def poisoned_steps(state, items):  # item i7 makes the model raise, as a poison event would
        if (items == 7).any():
            raise RuntimeError("poison")
        return steps(state, items)

    model.steps = poisoned_steps
    result = processor.process(events)
    assert (result.served, result.dead_lettered) == (4, 1)
    [dead] = _sent(producer, topics.dlq)
    assert dict(dead["headers"])["lrustream.reason"] == b"processing failed: RuntimeError: poison"
    assert dict(dead["headers"])["lrustream.source.offset"] == b"1"
    got = [json.loads(r["value"]) for r in _sent(producer, topics.recommendations)]
    want = [json.loads(v) for t, v in clean.producer.sent if t == topics.recommendations]
    assert [(r["source"], r["items"], r["scores"]) for r in got] == [(r["source"], r["items"], r["scores"])
                                                                      for r in want]
    for user in ("u1", "u2", "u3"):  # the states, too, are what they would be without the poison event
        assert processor.store.get(0, user).state == clean.store.get(0, user).state
    assert processor.store.applied_offset(0) == 4


def test_a_dead_letter_keeps_the_original_timestamp_and_headers_and_a_huge_one_is_truncated(
        tmp_path: Path) -> None:
    producer = RecordingProducer()
    processor, topics = _processor(tmp_path, producer)
    huge = b'{"user_id": "u1", "pad": "' + b"x" * 1_100_000 + b'"}'
    small = Input(0, 0, b"u1", b"{not json", 1234, [("trace", b"t-1")])
    big = Input(0, 1, b"u1", huge, 5678, [("trace", b"t-2")])
    result = processor.process([small, big])
    assert result.dead_lettered == 2
    first, second = _sent(producer, topics.dlq)
    assert (first["key"], first["value"], first["timestamp"]) == (b"u1", b"{not json", 1234)
    assert first["headers"][0] == ("trace", b"t-1") and "lrustream.truncated" not in dict(first["headers"])
    headers = dict(second["headers"])
    assert second["timestamp"] == 5678 and headers["trace"] == b"t-2"
    assert second["value"] == huge[:DLQ_TRUNCATED_VALUE_BYTES]
    assert headers["lrustream.truncated"] == b"true" and int(headers["lrustream.original.size"]) == len(huge)
    assert headers["lrustream.original.sha256"] == hashlib.sha256(huge).hexdigest().encode()
    assert headers["lrustream.reason"].startswith(b"oversized value")


def test_a_dead_letter_the_topic_refuses_as_too_large_goes_again_as_headers_only(tmp_path: Path) -> None:
    """The dead-letter topic's own record limit may be lower than ours: the refused copy is sent again with no
    value, the batch is not failed and the events around it are served."""
    def refuse_big_dead_letters(record: dict) -> KafkaError | None:
        too_big = record["topic"].endswith(".dlq") and len(record["value"] or b"") > 100
        return KafkaError(KafkaError.MSG_SIZE_TOO_LARGE) if too_big else None

    producer = RecordingProducer(fail=refuse_big_dead_letters)
    processor, topics = _processor(tmp_path, producer)
    result = processor.process([_event("u1", "i3", 0), Input(0, 1, b"u1", b"[" + b"1," * 5000 + b"1]", 9),
                                _event("u1", "i4", 2)])
    assert (result.served, result.dead_lettered) == (2, 1)
    refused, stub = _sent(producer, topics.dlq)
    assert refused["value"] is not None and stub["value"] is None
    assert dict(stub["headers"])["lrustream.truncated"] == b"true"
    assert dict(stub["headers"])["lrustream.reason"] == b"not a JSON object: list"
    assert processor.store.applied_offset(0) == 2


def test_the_processor_reads_its_settings_from_the_stream_section(tmp_path: Path) -> None:
    """The Worker hands the processor the config's sections as they are: top_k, exclude_seen, unknown_items,
    max_value_bytes and emit_training_examples are read from ``stream``, the topics from ``topics``."""
    producer = RecordingProducer()
    stream = StreamConfig(top_k=40, exclude_seen=False, unknown_items="oov", max_value_bytes=100)
    processor, topics = _processor(tmp_path, producer, stream=stream)
    long_value = json.dumps({"user_id": "u1", "item_id": "i4", "ts": 1, "pad": "x" * 100}).encode()
    result = processor.process([_event("u1", "i3", 0), _event("u1", "not-an-item", 1),
                                Input(0, 2, b"u1", long_value, 3)])
    assert (result.served, result.dead_lettered) == (2, 1)
    recs = [json.loads(r["value"]) for r in _sent(producer, topics.recommendations)]
    assert [len(r["items"]) for r in recs] == [40, 40], "all 40 items: none excluded as seen"
    [example] = [decode_example(r["value"]) for r in _sent(producer, topics.training_examples)]
    assert (example.items, example.new) == (["i3", "not-an-item"], 2)
    [dead] = _sent(producer, topics.dlq)
    assert dict(dead["headers"])["lrustream.reason"].startswith(b"oversized value")


def test_a_recommendation_not_acknowledged_fails_the_batch_and_commits_nothing(tmp_path: Path) -> None:
    def refuse_recommendations(record: dict) -> KafkaError | None:
        return KafkaError(KafkaError._MSG_TIMED_OUT) if record["topic"].endswith("recommendations") else None

    processor, _ = _processor(tmp_path, RecordingProducer(fail=refuse_recommendations))
    with pytest.raises(OutputError, match="not acknowledged"):
        processor.process([_event("u1", "i3", 0), _event("u2", "i4", 1)])
    assert processor.store.applied_offset(0) == -1 and processor.store.get(0, "u1") is None


def test_stopping_abandons_a_batch_that_waits_for_acknowledgements(tmp_path: Path) -> None:
    processor, _ = _processor(tmp_path, RecordingProducer(pending=True))
    threading.Timer(0.5, processor.stopping.set).start()
    t0 = time.monotonic()
    with pytest.raises(Stopping):
        processor.process([_event("u1", "i3", 0)])
    assert time.monotonic() - t0 < 2.0, "the stop was seen within a flush slice"
    assert processor.store.applied_offset(0) == -1


def test_batches_applied_without_a_commit_build_on_each_other_and_reach_the_store_only_at_the_commit(
        tmp_path: Path) -> None:
    """The pipelined path (stream/pipeline.py): ``apply`` leaves states pending, later batches read them, and
    ``commit`` makes them durable at once; the outcome equals one ``process`` per batch."""
    events = [_event("u1", "i3", 0), _event("u2", "i7", 1), _event("u1", "i4", 2), _event("u1", "i9", 3)]
    stepwise, _ = _processor(tmp_path, RecordingProducer(), "stepwise")
    for event in events:
        stepwise.process([event])
    producer = RecordingProducer()
    processor, topics = _processor(tmp_path, producer)
    for event in events:
        processor.apply([event])
    assert processor.pending and processor.store.get(0, "u1") is None and processor.store.applied_offset(0) < 0
    assert processor.commit() == {0: 3}
    assert not processor.pending and processor.commit() == {}
    for user in ("u1", "u2"):
        assert processor.store.get(0, user).state == stepwise.store.get(0, user).state
    got = [json.loads(r["value"]) for r in _sent(producer, topics.recommendations)]
    want = [json.loads(v) for t, v in stepwise.producer.sent if t == topics.recommendations]
    assert [(r["source"], r["items"]) for r in got] == [(r["source"], r["items"]) for r in want]


def test_discarded_batches_leave_the_committed_states_and_are_applied_again_in_full(tmp_path: Path) -> None:
    producer = RecordingProducer()
    processor, _ = _processor(tmp_path, producer)
    processor.process([_event("u1", "i3", 0)])
    committed = processor.store.get(0, "u1").state
    processor.apply([_event("u1", "i4", 1), _event("u1", "i5", 2)])
    processor.discard()
    assert not processor.pending and processor.store.get(0, "u1").state == committed
    result = processor.process([_event("u1", "i4", 1), _event("u1", "i5", 2)])
    assert (result.served, result.skipped) == (2, 0), "nothing discarded counts as applied"


def test_a_commit_whose_outputs_are_not_acknowledged_commits_nothing(tmp_path: Path) -> None:
    producer = RecordingProducer(fail=lambda record: KafkaError(KafkaError._MSG_TIMED_OUT))
    processor, _ = _processor(tmp_path, producer)
    processor.apply([_event("u1", "i3", 0)])
    with pytest.raises(OutputError):
        processor.commit()
    processor.discard()
    assert processor.store.get(0, "u1") is None and processor.store.applied_offset(0) < 0


def test_blocked_items_leave_every_ranking_the_others_keep_their_order_and_an_unknown_item_is_harmless(
        tmp_path: Path) -> None:
    events = [_event(f"u{k % 5}", f"i{k % 40 + 1}", k) for k in range(30)]
    clean, topics = _processor(tmp_path, RecordingProducer(), "clean")
    clean.process(events)
    want = [json.loads(r["value"]) for r in _sent(clean.producer, topics.recommendations)]
    blocked = {want[0]["items"][0], want[0]["items"][3]}
    producer = RecordingProducer()
    processor, _ = _processor(tmp_path, producer)
    processor.block(frozenset(blocked | {"not-in-the-catalogue"}))
    processor.process(events)
    got = [json.loads(r["value"]) for r in _sent(producer, topics.recommendations)]
    for g, w in zip(got, want, strict=True):
        assert not blocked & set(g["items"]) and len(g["items"]) == len(w["items"])
        kept = [i for i in w["items"] if i not in blocked]
        assert g["items"][:len(kept)] == kept  # the rest move up; the states are the same, so the order is too
    processor.block(frozenset())
    processor.process([_event("u0", "i1", 30)])
    clean.process([_event("u0", "i1", 30)])
    assert json.loads(_sent(producer, topics.recommendations)[-1]["value"])["items"] == \
        json.loads(_sent(clean.producer, topics.recommendations)[-1]["value"])["items"]


def test_each_event_is_scored_against_the_recommendation_served_before_it_for_the_live_hit_rate(
        tmp_path: Path) -> None:
    producer = RecordingProducer()
    processor, topics = _processor(tmp_path, producer, stream=StreamConfig(emit_training_examples=True))
    version = processor.serving.version
    processor.process([_event("u1", "i3", 0), _event("u2", "i9", 1)])
    first = [decode_example(r["value"]) for r in _sent(producer, topics.training_examples)]
    assert [e.live for e in first] == [{}, {}], "a user's first event has nothing served before it"
    [rec] = [json.loads(r["value"]) for r in _sent(producer, topics.recommendations)
             if json.loads(r["value"])["user_id"] == "u1"]
    producer.records.clear()
    # u1: a hit (the top item served after i3), then i3 again, which no recommendation holds (seen items are
    # excluded); u2 misses once
    processor.process([_event("u1", rec["items"][0], 2), _event("u1", "i3", 3), _event("u2", "i9", 4)])
    live = {e.user_id: e.live for e in (decode_example(r["value"]) for r in _sent(producer, topics.training_examples))}
    assert live == {"u1": {version: (2, 1)}, "u2": {version: (1, 0)}}
    metrics = processor.metrics
    assert metrics.live_events.labels(version=version)._value.get() == 3
    assert metrics.live_hits.labels(version=version)._value.get() == 1
