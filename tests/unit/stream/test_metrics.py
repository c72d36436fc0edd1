"""WorkerMetrics: the events/s gauge over the last 10 s."""

from stream.metrics import WorkerMetrics


def rate(m: WorkerMetrics) -> float:
    return m.events_per_s._value.get()


def test_events_per_second_counts_the_last_ten_seconds_only() -> None:
    m = WorkerMetrics()
    for t in range(20):  # 100 events a second for 20 s, in batches of 25
        for q in range(4):
            m.observe_rate(25, now=t + q / 4)
    assert rate(m) == 41 * 25 / 10.0  # the batches from t=9.75 s on: 41 of them over 10 s
    m.observe_rate(5, now=40.0)  # after a pause, only the new batch is left
    assert rate(m) == 5.0
