"""The guard against consumer skips (faust-streaming #596), in the processor: offsets the consumer skipped are
fetched directly, all of them or the batch fails, chunk by chunk."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream.processor import GapFillError, Input
from tests.unit.stream.test_processor import RecordingProducer, _event, _processor, _sent


def _chunked(records: list[Input], size: int) -> Iterator[list[Input]]:
    for k in range(0, len(records), size):
        yield records[k:k + size]


def test_skipped_offsets_are_applied_chunk_by_chunk_before_the_batch_as_if_never_skipped(tmp_path: Path) -> None:
    events = [_event(f"u{k % 7}", f"i{1 + k % 40}", k) for k in range(300)]
    clean, topics = _processor(tmp_path, RecordingProducer(), "clean")
    clean.process(events[:10])
    clean.process(events[10:])
    fetched: list[tuple[int, int]] = []

    def fetch(partition: int, first: int, last: int) -> Iterator[list[Input]]:
        fetched.append((first, last))
        return _chunked([e for e in events if first <= e.offset <= last], 64)

    producer = RecordingProducer()
    processor, _ = _processor(tmp_path, producer)
    processor.fetch = fetch
    processor.process(events[:10])
    result = processor.process(events[250:])  # the consumer skipped offsets 10..249
    assert fetched == [(10, 249)] and result.gap_filled == 240 and result.served == 290
    got = [json.loads(r["value"]) for r in _sent(producer, topics.recommendations)]
    want = [json.loads(v) for t, v in clean.producer.sent if t == topics.recommendations]
    def by_offset(recs: list[dict]) -> list[tuple[int, list[str]]]:
        return sorted((r["source"]["offset"], r["items"]) for r in recs)

    assert by_offset(got) == by_offset(want), "the same recommendations as a run that skipped nothing"
    assert processor.store.applied_offset(0) == 299


def test_a_gap_fill_that_fails_part_way_commits_only_what_was_applied(tmp_path: Path) -> None:
    events = [_event(f"u{k % 7}", f"i{1 + k % 40}", k) for k in range(300)]

    def fetch(partition: int, first: int, last: int) -> Iterator[list[Input]]:
        yield [e for e in events if first <= e.offset < first + 50]
        raise GapFillError("broker went away")

    processor, _ = _processor(tmp_path, RecordingProducer())
    processor.process(events[:10])
    processor.fetch = fetch
    with pytest.raises(GapFillError):
        processor.process(events[250:])
    assert processor.store.applied_offset(0) == 59, "the marker never passes an offset that was not applied"
