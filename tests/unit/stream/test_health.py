"""/health turns "degraded" for each way a live worker can stop serving, and back to "ok" by itself."""

from __future__ import annotations

from stream.health import Liveness


def test_idle_worker_with_nothing_waiting_is_ok() -> None:
    live = Liveness(stall_after_s=10, progress_at=0.0)
    assert live.report(pending=0, now=1000.0) == ("ok", None)
    assert live.report(pending=None, now=1000.0) == ("ok", None)


def test_a_failing_micro_batch_is_degraded_at_once_with_its_error_and_clears_on_success() -> None:
    live = Liveness(stall_after_s=10, progress_at=0.0)
    live.started(now=1.0)
    live.failed(RuntimeError("3 records still pending after 60 s"))
    status, reason = live.report(pending=5, now=1.5)
    assert status == "degraded" and reason is not None and "3 records still pending" in reason
    live.finished(now=2.0)
    assert live.report(pending=5, now=2.5) == ("ok", None)


def test_a_micro_batch_that_hangs_past_the_limit_is_degraded() -> None:
    live = Liveness(stall_after_s=10, progress_at=0.0)
    live.started(now=100.0)
    assert live.report(pending=0, now=109.0)[0] == "ok"
    status, reason = live.report(pending=0, now=111.0)
    assert status == "degraded" and reason is not None and "in progress for 11 s" in reason


def test_events_waiting_with_no_progress_mean_a_dead_fetcher() -> None:
    live = Liveness(stall_after_s=10, progress_at=50.0)
    assert live.report(pending=0, now=100.0)[0] == "ok"  # idle because there is nothing to do
    status, reason = live.report(pending=7, now=100.0)
    assert status == "degraded" and reason is not None and reason.startswith("7 events waiting")
    assert live.report(pending=7, now=55.0)[0] == "ok"  # within the limit: just between batches
