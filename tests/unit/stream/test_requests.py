"""A request for a user's top-K (Processor.recommend) without Kafka: it answers what the user's last
event was recommended, from applied or committed state, without advancing it; exclusions, blocked items and the
popular fallback for users the model cannot rank."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lrustream.kernel.config import StreamConfig, load_config
from models import LRURecConfig, build_model
from models.store import POPULAR_NOTE, ModelStore, popular_note
from models.vocab import Vocabulary
from state.store import NotReady, StateStore
from stream.processor import Processor
from stream.serving import Serving
from tests.streamkit import build_processor
from tests.unit.stream.test_processor import RecordingProducer, _event, _processor, _sent


def _last_emitted(processor: Processor, topic: str) -> dict[str, dict]:
    return {r["user_id"]: r for r in (json.loads(x["value"]) for x in _sent(processor.producer, topic))}


@pytest.mark.parametrize("kept", [0, 100], ids=["scored", "kept answers"])
def test_a_request_answers_the_users_last_recommendation_from_applied_or_committed_state_without_advancing_it(
        tmp_path: Path, kept: int) -> None:
    processor, topics = _processor(tmp_path, RecordingProducer(), stream=StreamConfig(answer_cache_users=kept))
    processor.process([_event(f"u{k % 5}", f"i{k % 40 + 1}", k) for k in range(30)])
    processor.apply([_event(f"u{k % 3}", f"i{(3 * k) % 40 + 1}", k) for k in range(30, 37)])  # not committed
    emitted = _last_emitted(processor, topics.recommendations)
    for user, last in emitted.items():
        answer = processor.recommend(0, user, 10)
        assert (answer["items"], answer["scores"]) == (last["items"], last["scores"]), user
        assert answer["source"] == "request" and "fallback" not in answer
    before = processor.lookup(0, "u1")
    processor.recommend(0, "u1", 10)
    assert processor.lookup(0, "u1") is before  # nothing advanced
    processor.commit()
    assert processor.recommend(0, "u1", 10)["items"] == emitted["u1"]["items"]
    assert len(processor.recommend(0, "u1", 3)["items"]) == 3


def test_excluded_and_blocked_items_leave_the_answer_and_the_others_move_up(tmp_path: Path) -> None:
    processor, _ = _processor(tmp_path, RecordingProducer())
    processor.process([_event(f"u{k % 5}", f"i{k % 40 + 1}", k) for k in range(30)])
    want = processor.recommend(0, "u2", 10)["items"]
    processor.block(frozenset({want[1]}))
    got = processor.recommend(0, "u2", 10, exclude=[want[0], "never-heard-of"])["items"]
    assert got[:8] == want[2:] and not {want[0], want[1]} & set(got) and len(got) == 10


def test_a_record_without_its_hidden_output_is_answered_from_its_window(tmp_path: Path) -> None:
    """Records written before format 2 (or re-derived since their last event) hold no hidden output: the model
    steps through the window from a fresh state, which is the same maths as the steps the stream took."""
    processor, topics = _processor(tmp_path, RecordingProducer())
    processor.process([_event(f"u{k % 5}", f"i{k % 40 + 1}", k) for k in range(30)])
    last = _last_emitted(processor, topics.recommendations)["u3"]
    record = processor.lookup(0, "u3")
    processor.store.commit({0: ({"u3": dataclasses.replace(record, hidden=b"")}, 29)})
    answer = processor.recommend(0, "u3", 10)
    assert answer["items"] == last["items"]
    assert answer["scores"] == pytest.approx(last["scores"], abs=1e-4)


def test_a_user_without_state_gets_the_most_popular_items_not_excluded_nor_blocked(tmp_path: Path) -> None:
    processor, _ = _processor(tmp_path, RecordingProducer())
    events = [_event(f"u{k}", "i7", k) for k in range(6)] + [_event(f"v{k}", "i9", 6 + k) for k in range(4)] + \
        [_event(f"w{k}", f"i{20 + k}", 10 + k) for k in range(3)]
    processor.process(events)
    answer = processor.recommend(0, "stranger", 4)
    assert answer["fallback"] == "popular" and answer["items"][:2] == ["i7", "i9"] and len(answer["items"]) == 4
    assert answer["scores"][0] == pytest.approx(6, rel=1e-3)  # six events just now: no time to decay
    processor.block(frozenset({"i7"}))
    assert processor.recommend(0, "stranger", 2, exclude=["i9"])["items"] == ["i20", "i21"]


def test_a_user_whose_window_holds_only_unknown_items_gets_the_popular_fallback_on_the_topic_too(
        tmp_path: Path) -> None:
    processor, topics = _processor(tmp_path, RecordingProducer(), stream=StreamConfig(
        emit_training_examples=False, unknown_items="oov"))
    processor.process([_event(f"u{k}", "i5", k) for k in range(3)] + [_event("new", "brand-new", 3),
                                                                      _event("new", "also-new", 4)])
    emitted = [json.loads(r["value"]) for r in _sent(processor.producer, topics.recommendations)]
    assert [r.get("fallback") for r in emitted] == [None, None, None, "popular", "popular"]
    assert emitted[-1]["items"] == ["i5"]  # the one item any event has named
    answer = processor.recommend(0, "new", 10)
    assert answer["fallback"] == "popular" and answer["items"] == ["i5"]
    processor.process([_event("new", "i5", 5)])  # a known item: the model ranks from now on
    assert "fallback" not in json.loads(_sent(processor.producer, topics.recommendations)[-1]["value"])


def test_a_partition_not_restored_here_is_not_answered(tmp_path: Path) -> None:
    processor, _ = _processor(tmp_path, RecordingProducer())
    with pytest.raises(NotReady):
        processor.recommend(3, "u1", 10)


def _ranked(answer: dict) -> tuple:
    """What a request answers, without its clock readings."""
    return answer["items"], answer["scores"], answer["model_version"], answer.get("fallback")


def test_a_kept_answer_is_what_scoring_the_stored_state_gives_and_is_used_only_while_nothing_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests with the default k and no exclusions are answered from the answer kept for the user's last event
    (Processor._kept_answer): the same items and scores as scoring the record, and never after a change."""
    scoring, _ = _processor(tmp_path, RecordingProducer(), "scoring", StreamConfig(answer_cache_users=0))
    keeping, _ = _processor(tmp_path, RecordingProducer(), "keeping", StreamConfig(answer_cache_users=3))
    events = [_event(f"u{k % 5}", f"i{k % 40 + 1}", k) for k in range(30)]
    for processor in (scoring, keeping):
        processor.process(events[:20])
        processor.apply(events[20:])  # u0..u4, the last three served (u2, u3, u4) kept
    users = [f"u{k}" for k in range(5)]
    assert [_ranked(keeping.recommend(0, u, 10)) for u in users] == [_ranked(scoring.recommend(0, u, 10))
                                                                     for u in users]
    assert sorted(user for _, user in keeping._answers) == ["u2", "u3", "u4"]  # the most recently served

    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("scored")

    monkeypatch.setattr(keeping.serving, "top", no_scoring)
    keeping.commit()
    kept = keeping.recommend(0, "u3", 10)  # answered without scoring, from committed state too
    assert _ranked(kept) == _ranked(scoring.recommend(0, "u3", 10))
    for changed in (lambda: keeping.recommend(0, "u3", 5), lambda: keeping.recommend(0, "u3", 10, exclude=["i1"]),
                    lambda: keeping.recommend(0, "u0", 10)):  # another k, an exclusion, a user not kept
        with pytest.raises(AssertionError, match="scored"):
            changed()
    keeping.block(frozenset({kept["items"][0]}))
    with pytest.raises(AssertionError, match="scored"):
        keeping.recommend(0, "u3", 10)  # the blocked items changed since
    monkeypatch.undo()
    scoring.block(frozenset({kept["items"][0]}))
    assert _ranked(keeping.recommend(0, "u3", 10)) == _ranked(scoring.recommend(0, "u3", 10))
    keeping.process([_event("u3", "i9", 30)])  # a new event keeps its own answer (with the block)
    scoring.process([_event("u3", "i9", 30)])
    assert keeping._answers[(0, "u3")].offset == 30
    assert _ranked(keeping.recommend(0, "u3", 10)) == _ranked(scoring.recommend(0, "u3", 10))


def test_a_worker_seeded_from_its_version_answers_a_cold_user_in_full_after_two_events(tmp_path: Path) -> None:
    """The serving version's "popular" note seeds the fallback: two events seen, k=10 still gets ten items, the
    two seen first; a swap to a version without the note leaves the live counts alone."""
    cfg = load_config(overrides=[f"model_store.dir={tmp_path / 'models'}"])
    store = ModelStore(cfg.model_store.dir)
    torch.manual_seed(0)
    model = build_model(LRURecConfig(d_model=16, num_layers=1, max_len=20), 40)
    vocab = Vocabulary(f"i{k}" for k in range(1, 41))
    trained_on = [f"i{k}" for k in range(1, 41) for _ in range(41 - k)] + ["not-in-the-vocabulary"] * 99
    seeded = store.publish(model, vocab, notes={POPULAR_NOTE: popular_note(trained_on)}).version
    processor = build_processor(cfg, Serving.load(store, seeded), StateStore(tmp_path / "state"),
                                RecordingProducer())
    processor.process([_event("a", "i30", 0), _event("b", "i33", 1)])
    answer = processor.recommend(0, "stranger", 10)
    assert answer["fallback"] == "popular"
    assert answer["items"] == ["i30", "i33", *(f"i{k}" for k in range(1, 9))]
    assert processor.recommend(0, "stranger", 3, exclude=["i30", "i1"])["items"] == ["i33", "i2", "i3"]
    processor.swap(Serving.load(store, store.publish(model, vocab).version))
    assert processor.recommend(0, "stranger", 10)["items"] == ["i30", "i33"]


def test_events_and_requests_ranked_through_an_index_get_the_exact_answers_without_any_excluded_item(
        tmp_path: Path) -> None:
    """The processor's two ranking calls (a micro-batch's events, a request) through the approximate index of
    stream/retrieval.py. At 40 items the index is one cluster, scanned whole: its answers must be the exact
    ones, item for item and score for score."""
    from stream.retrieval import ANY_ROWS, IndexSettings, ItemIndex

    exact, topics = _processor(tmp_path, RecordingProducer(), "exact")
    cfg = load_config(overrides=[f"model_store.dir={tmp_path / 'models'}"])
    serving = Serving.load(ModelStore(cfg.model_store.dir))
    serving.index = ItemIndex.build(serving.model, IndexSettings(above_items=0, recall=0.99))
    serving.index.max_rows = ANY_ROWS  # at 40 items exact ranking is faster: the index is forced, to be tested
    indexed = build_processor(cfg, serving, StateStore(tmp_path / "indexed"), RecordingProducer(), None)
    events = [_event(f"u{k % 5}", f"i{k % 40 + 1}", k) for k in range(60)]
    for processor in (exact, indexed):
        processor.process(events)
        processor.block(frozenset({"i3"}))
    want, got = (_last_emitted(p, topics.recommendations) for p in (exact, indexed))
    for user in want:
        assert got[user]["items"] == want[user]["items"]
        assert got[user]["scores"] == pytest.approx(want[user]["scores"], abs=1e-5)
        window = {f"i{k % 40 + 1}" for k in range(60) if f"u{k % 5}" == user}
        answer = indexed.recommend(0, user, 10, exclude=[want[user]["items"][0]])
        assert answer["items"] == exact.recommend(0, user, 10, exclude=[want[user]["items"][0]])["items"]
        assert not set(answer["items"]) & (window | {"i3", want[user]["items"][0]})
