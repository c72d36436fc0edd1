"""The guard against consumer skips (faust-streaming #596): offsets the consumer skipped are fetched directly,
all of them or the batch fails, in bounded chunks (issue 14, item 2)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from lrustream.kernel.config import Config
from lrustream.kernel.kafka import producer_config
from stream.processor import GapFillError, Input
from stream.topics import create_topics
from stream.worker import fetch_range
from tests.test_processor import RecordingProducer, _event, _processor, _sent


@pytest.mark.kafka
def test_fetch_range_yields_the_whole_range_in_bounded_chunks_or_raises(kafka_cfg: Config) -> None:
    create_topics(kafka_cfg)
    producer = Producer(producer_config(kafka_cfg))
    for k in range(2600):
        producer.produce(kafka_cfg.topics.interactions, f"v{k}".encode(), b"u", partition=0,
                         headers=[("n", str(k).encode())])
    assert producer.flush(30) == 0
    fetch = fetch_range(kafka_cfg, chunk_size=500, stall_s=2.0)
    chunks = list(fetch(0, 100, 2199))
    assert [i.offset for c in chunks for i in c] == list(range(100, 2200))
    assert all(0 < len(c) <= 500 for c in chunks) and len(chunks) >= 5
    assert chunks[0][0].value == b"v100" and chunks[0][0].headers == [("n", b"100")]
    t0 = time.monotonic()
    with pytest.raises(GapFillError, match="not fetched within"):  # the records up to 2,999 do not exist
        for _ in fetch(0, 2500, 2999):
            pass
    assert time.monotonic() - t0 < 10, "gave up after the stall time, not the old fixed 30 s"


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
