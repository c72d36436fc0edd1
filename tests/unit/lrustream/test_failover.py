"""``lrustream bench failover``'s figures from what its reader saw: when recommendations flow again on every
partition, when their p99 is back under 50 ms, which events were delayed, and the steady state."""

from __future__ import annotations

import math

from lrustream.bench.failover import Fault, fault_figures, steady_figures

T = 100_000  # the kill, in ms


def _steady(partitions: int, start: int, end: int, latency: int, every: int = 10) -> list[tuple[int, int, int | None]]:
    return [(t // every % partitions, t, t + latency) for t in range(start, end, every)]


def test_a_fault_that_stops_nothing_reads_as_one_events_latency() -> None:
    events = _steady(2, T - 5_000, T + 10_000, latency=5)
    figures = fault_figures(Fault("input-leader", 1, T, T + 10_000), events, partitions=2)
    assert figures["flowing_s"] <= 0.015  # the first event after T on each partition, served 5 ms later
    assert figures["p99_back_s"] == 0.0 and figures["delayed"] == 0


def test_a_stalled_partition_counts_until_its_first_new_event_is_served() -> None:
    events = _steady(2, T - 5_000, T + 20_000, latency=5)
    stalled_until = T + 7_000  # partition 1: nothing emitted until then, everything produced meanwhile waits
    events = [(p, t, max(e, stalled_until + (t - T) // 100) if p == 1 and t >= T - 500 and e is not None else e)
              for p, t, e in events]
    figures = fault_figures(Fault("input-leader", 2, T, T + 20_000), events, partitions=2)
    assert 7.0 <= figures["flowing_s"] < 7.1
    # events of partition 1 produced in the stall wait up to 7.5 s; latency stays above 50 ms until the queue of
    # partition 1 is worked off, which the emission times above drain at ten events per ms produced after T
    assert figures["p99_back_s"] >= 7.0
    assert figures["delayed"] > 0


def test_an_event_never_served_keeps_p99_high_and_a_partition_never_back_is_infinite() -> None:
    events = _steady(2, T, T + 5_000, latency=5)
    events = [(p, t, None if p == 1 else e) for p, t, e in events]
    figures = fault_figures(Fault("controller", 3, T, T + 5_000), events, partitions=2)
    assert math.isinf(figures["flowing_s"])
    assert figures["p99_back_s"] == 5.0
    assert figures["delayed"] == sum(1 for p, _, _ in events if p == 1)


def test_steady_figures_use_only_served_events_of_the_window() -> None:
    events = [(0, t, t + (t % 100)) for t in range(0, 10_000, 10)] + [(0, 20_000, None)]
    figures = steady_figures(events, 0, 10_000)
    assert figures["events"] == 1000 and figures["p50_ms"] == 50 and figures["p99_ms"] == 90
