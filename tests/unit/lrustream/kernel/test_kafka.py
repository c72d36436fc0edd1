"""lrustream/kernel/kafka.py without a broker: murmur2 partitioning as Kafka's own test vectors say, and end
offsets that wait out a partition without a leader yet."""

from __future__ import annotations

import pytest

from lrustream.kernel.kafka import murmur2


def test_murmur2_matches_kafkas_own_test_vectors() -> None:
    vectors = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
               b"a-little-bit-longer-string": -1486304829, b"abc": 479470107,
               b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971}
    assert {k: murmur2(k) for k in vectors} == vectors


class _NotLeaderYet:
    """A consumer whose partition answers NOT_LEADER a few times, as one does just after topic creation."""

    def __init__(self, failures: int, code: int) -> None:
        self.failures, self.code, self.calls = failures, code, 0

    def get_watermark_offsets(self, tp, timeout):  # type: ignore[no-untyped-def]
        from confluent_kafka import KafkaError, KafkaException

        self.calls += 1
        if self.calls <= self.failures:
            raise KafkaException(KafkaError(self.code, "Failed to get watermark offsets"))
        return 0, 42


def test_end_offsets_wait_out_a_partition_that_has_no_leader_yet() -> None:
    """A CI run failed reading recommendations because a new partition answered NOT_LEADER once."""
    from confluent_kafka import KafkaError, KafkaException

    from lrustream.kernel.kafka import high_watermarks

    consumer = _NotLeaderYet(failures=3, code=KafkaError.NOT_LEADER_FOR_PARTITION)
    assert high_watermarks(consumer, "t", [0, 1], timeout_s=10) == {0: 42, 1: 42}
    assert consumer.calls == 5
    with pytest.raises(KafkaException):  # a real error is not retried
        high_watermarks(_NotLeaderYet(failures=1, code=KafkaError.TOPIC_AUTHORIZATION_FAILED), "t", [0], 10)
    with pytest.raises(KafkaException):  # and a transient one not for ever
        high_watermarks(_NotLeaderYet(failures=10**6, code=KafkaError.NOT_LEADER_FOR_PARTITION), "t", [0], 0.5)


