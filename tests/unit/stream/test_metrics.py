"""WorkerMetrics: the events/s gauge over the last 10 s; the health gauge."""

import pytest

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


def health_of(m: WorkerMetrics) -> dict[str, float]:
    return {s.labels["state"]: s.value for f in m.registry.collect() if f.name == "lrustream_health"
            for s in f.samples}


def test_the_health_gauge_shows_one_state_at_a_time_and_refuses_an_unknown_one() -> None:
    m = WorkerMetrics()
    assert health_of(m) == {"ok": 0, "starting": 1, "waiting": 0, "degraded": 0}, "a new worker is starting"
    m.set_health("degraded")
    assert health_of(m) == {"ok": 0, "starting": 0, "waiting": 0, "degraded": 1}
    m.set_health("ok")
    assert health_of(m) == {"ok": 1, "starting": 0, "waiting": 0, "degraded": 0}
    with pytest.raises(ValueError, match="unknown health state"):
        m.set_health("fine")
    assert health_of(m)["ok"] == 1, "a refused state changes nothing"
