"""The micro-batch processor without Kafka (a recording producer, a local state store): cases that are hard
to reach through a running worker."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from lrustream.config import load_config
from models import build_model
from models.store import ModelStore
from models.vocab import Vocabulary
from state.store import StateStore
from stream.serving import Serving
from stream.worker import Input, Processor


class RecordingProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None]] = []

    def produce(self, topic, value, key, headers=None, on_delivery=None) -> None:
        self.sent.append((topic, value))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
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
    model = build_model("lrurec", 40, d_model=16, num_layers=1, max_len=20)
    v1 = store.publish(model, Vocabulary(f"i{k}" for k in range(1, 41))).version
    model.grow_items(41)
    v2 = store.publish(model, Vocabulary([*(f"i{k}" for k in range(1, 41)), "new-item"])).version
    producer = RecordingProducer()
    processor = Processor(Serving.load(store, v2), StateStore(tmp_path / "state"), producer, topics=cfg.topics,
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
