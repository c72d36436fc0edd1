"""Latency figures without a broker: the per-stage split of recommendation records (queueing, processing,
total), its p50/p99/p99.9 with unserved events, and how ``bench stream`` and ``make demo`` print them."""

from __future__ import annotations

import math

import pytest

from lrustream.bench.stream import LatencyPlan, input_rate, latency_plan, phase_figures, phase_lines
from lrustream.children import (
    format_stages,
    format_worker_stages,
    latency_stages,
    parse_histograms,
    stage_percentiles,
    timestamps,
    worker_stages,
)
from lrustream.demo import summarise
from stream.metrics import WorkerMetrics


def test_stages_split_records_that_carry_received_ts() -> None:
    records = [{"kafka_ts": 1000, "received_ts": 1004, "emitted_ts": 1010},
               {"kafka_ts": 2000, "received_ts": 2001, "emitted_ts": 2003}]
    assert latency_stages(records) == {"queueing": [4.0, 1.0], "processing": [6.0, 2.0], "total": [10.0, 3.0]}


def test_records_without_received_ts_count_in_total_only() -> None:
    records = [{"kafka_ts": 1000, "emitted_ts": 1010},  # an older worker's record
               {"kafka_ts": 1000, "received_ts": 1002, "emitted_ts": 1005}]
    assert latency_stages(records) == {"queueing": [2.0], "processing": [3.0], "total": [10.0, 5.0]}
    assert latency_stages(records[:1])["queueing"] == []


def test_stages_skip_records_before_since_or_without_timestamps() -> None:
    records = [{"kafka_ts": 999, "received_ts": 1000, "emitted_ts": 1001},  # an earlier phase's event
               {"kafka_ts": 0, "emitted_ts": 5}, {"kafka_ts": -1, "emitted_ts": 5},  # no Kafka timestamp
               {"emitted_ts": 5}, {"kafka_ts": 1000},
               {"kafka_ts": 1000, "received_ts": 1001, "emitted_ts": 1003}]
    assert latency_stages(records, since_ms=1000) == {"queueing": [1.0], "processing": [2.0], "total": [3.0]}


def test_timestamps_keep_only_the_latency_fields() -> None:
    rec = {"user_id": "u", "items": ["a"], "kafka_ts": 1, "received_ts": 2, "emitted_ts": 3, "model_version": "v"}
    assert timestamps(rec) == {"kafka_ts": 1, "received_ts": 2, "emitted_ts": 3}
    assert timestamps({"kafka_ts": None, "emitted_ts": 3}) == {"emitted_ts": 3}
    assert timestamps(["not", "a", "record"]) == {}


def test_percentiles_per_stage() -> None:
    stages = {"queueing": [], "processing": [], "total": [float(ms) for ms in range(1, 1001)]}
    assert stage_percentiles(stages) == {"total": {"p50": 501.0, "p99": 991.0, "p99.9": 1000.0}}


def test_unserved_events_are_infinitely_late_in_total_only() -> None:
    stages = {"queueing": [1.0] * 98, "processing": [2.0] * 98, "total": [3.0] * 98}
    summary = stage_percentiles(stages, unserved=2)
    assert summary["total"]["p50"] == 3.0 and math.isinf(summary["total"]["p99"])
    assert summary["queueing"]["p99.9"] == 1.0 and summary["processing"]["p99.9"] == 2.0
    assert format_stages(summary, ["total"]) == "total p50 3.0 ms, p99 unserved, p99.9 unserved"


def test_format_puts_total_first_and_names_only_present_stages() -> None:
    summary = stage_percentiles({"queueing": [1.0], "processing": [1234.5], "total": [1235.5]})
    assert format_stages(summary) == ("total p50 1,235.5 ms, p99 1,235.5 ms, p99.9 1,235.5 ms; "
                                      "queueing p50 1.0 ms, p99 1.0 ms, p99.9 1.0 ms; "
                                      "processing p50 1,234.5 ms, p99 1,234.5 ms, p99.9 1,234.5 ms")
    assert format_stages(stage_percentiles({"total": [2.0]})) == "total p50 2.0 ms, p99 2.0 ms, p99.9 2.0 ms"


def test_bench_phase_figures_and_lines() -> None:
    records = [{"kafka_ts": 100 + k, "received_ts": 101 + k, "emitted_ts": 104 + k} for k in range(9)]
    assert input_rate(records) == 1000.0  # one event a millisecond
    figures = phase_figures(1000.0, latency_stages(records, since_ms=100), sent=10, input_per_s=998.0, backlog=3)
    assert figures["worker_1000_sent"] == 10 and figures["worker_1000_served"] == 9
    assert figures["worker_1000_backlog"] == 3 and figures["worker_1000_input_per_s"] == 998.0
    assert figures["worker_1000_total_p50_ms"] == 4.0 and math.isinf(figures["worker_1000_total_p99.9_ms"])
    assert figures["worker_1000_queueing_p99.9_ms"] == 1.0 and figures["worker_1000_processing_p50_ms"] == 3.0
    head, total, split = phase_lines(1000.0, figures, wait_s=10)
    assert head == ("worker @ 1,000 events/s (served input at 998/s): 10 events sent (3 earlier ones still "
                    "queued), 9 served within 10 s of the last")
    assert total == "  latency total p50 4.0 ms, p99 unserved, p99.9 unserved"
    assert split == "  by stage: queueing p50 1.0 ms, p99 1.0 ms, p99.9 1.0 ms; processing p50 3.0 ms, p99 3.0 ms, " \
                    "p99.9 3.0 ms"


def test_bench_phase_without_received_ts_has_no_split() -> None:
    figures = phase_figures(2000.0, latency_stages([{"kafka_ts": 1, "emitted_ts": 6}]), sent=1,
                            input_per_s=math.nan, backlog=0)
    assert not any("queueing" in key or "processing" in key for key in figures)
    assert len(phase_lines(2000.0, figures, wait_s=5)) == 2


def test_latency_plan_parses_the_options() -> None:
    assert latency_plan("1000, 2000,5000", 10, 5) == LatencyPlan((1000.0, 2000.0, 5000.0), 10, 5)
    for rates, seconds, wait in [("1000,x", 10, 5), ("", 10, 5), ("0", 10, 5), ("inf", 10, 5), ("1000", 0, 5),
                                 ("1000", 10, -1)]:
        with pytest.raises(ValueError, match="--latency"):
            latency_plan(rates, seconds, wait)


def test_demo_summary_prints_p999_and_the_split_when_there_is_one() -> None:
    out: list[str] = []
    records = [{"kafka_ts": 10, "received_ts": 12, "emitted_ts": 15}, {"kafka_ts": 10, "emitted_ts": 20}]
    summarise(records, sent=2, seconds=1.5, log=out.append)
    assert out == ["summary: 2 events published, 2 recommendations in 1.5 s; event-to-recommendation latency "
                   "total p50 10.0 ms, p99 10.0 ms, p99.9 10.0 ms",
                   "  by stage: queueing p50 2.0 ms, p99 2.0 ms, p99.9 2.0 ms; "
                   "processing p50 3.0 ms, p99 3.0 ms, p99.9 3.0 ms"]
    out.clear()
    summarise([{"kafka_ts": 10, "emitted_ts": 15}], sent=1, seconds=1.0, log=out.append)
    assert len(out) == 1 and "p99.9 5.0 ms" in out[0]


def test_the_demo_summary_times_the_events_after_the_warm_up_and_reports_the_warm_up_apart() -> None:
    records = [{"kafka_ts": 1005, "received_ts": 1007, "emitted_ts": 1010},
               {"kafka_ts": 1000, "received_ts": 1300, "emitted_ts": 1400}]  # sent first: a cold start
    out: list[str] = []
    summarise(records, sent=2, seconds=6.0, log=out.append, warm_up=1)
    assert out[0].startswith("summary: 2 events published (1 warm-up, then 1 timed), 2 recommendations in 6.0 s; "
                             "event-to-recommendation latency of the timed events total p50 5.0 ms")
    assert "total p50 5.0 ms, p99 5.0 ms" in out[0] and "queueing p50 2.0 ms" in out[1]
    assert out[2].startswith("  warm-up (the first 1 events") and "total p50 400.0 ms" in out[2]


def test_worker_stages_count_only_what_the_histograms_observed_between_two_scrapes() -> None:
    metrics = WorkerMetrics()
    metrics.step_latency.observe(0.5)  # before the first scrape: not counted
    before = parse_histograms(metrics.render().decode())
    for _ in range(98):
        metrics.step_latency.observe(0.0015)
    metrics.step_latency.observe(0.04)
    metrics.step_latency.observe(0.04)
    metrics.ack_latency.observe(0.004)
    after = parse_histograms(metrics.render().decode())
    stages = worker_stages(before, after)
    assert stages == {"model": {"p50_ms": 2.0, "p99_ms": 50.0, "count": 100.0},
                      "ack": {"p50_ms": 5.0, "p99_ms": 5.0, "count": 1.0}}  # no commit observed: not reported
    assert format_worker_stages(stages) == ("model step and scoring per micro-batch p50 <= 2 ms, p99 <= 50 ms "
                                            "(100); produce to broker ack per recommendation p50 <= 5 ms, "
                                            "p99 <= 5 ms (1)")
    assert worker_stages({}, after) == {}  # a scrape that failed: nothing, never everything since start


def test_bench_phase_prints_the_workers_histograms_when_it_has_them() -> None:
    in_worker = {"model": {"p50_ms": 2.0, "p99_ms": 7.5, "count": 1200.0}}
    figures = phase_figures(2000.0, latency_stages([{"kafka_ts": 1, "received_ts": 2, "emitted_ts": 6}]), sent=1,
                            input_per_s=math.nan, backlog=0, in_worker=in_worker)
    assert figures["worker_2000_in_model_p99_ms"] == 7.5 and figures["worker_2000_in_model_count"] == 1200
    assert phase_lines(2000.0, figures, wait_s=5)[-1] == (
        "  in the worker (its histograms; bucket upper bounds): model step and scoring per micro-batch p50 <= 2 ms, "
        "p99 <= 7.5 ms (1,200)")
