"""The direct reader of skipped offsets (faust-streaming #596) on a real broker: the whole range in bounded
chunks, or GapFillError (the processor's side: tests/unit/stream/test_gap_fill.py)."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer

from lrustream.kernel.config import Config
from lrustream.kernel.kafka import producer_config
from stream.processor import GapFillError
from stream.topics import create_topics
from stream.worker import fetch_range


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


