"""The trainer's /metrics reflect its round records, /health turns "degraded" and back, and the HTTP server
answers both (token on /metrics only) without a broker."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from trainer.service import TrainerHealth, TrainerHttp, TrainerMetrics, health_body

PUBLISHED = {"at": 1_700_000_000.0, "published": "v000007", "refused": None, "seconds": 12.5,
             "gate": {"candidate": {"HR@10": 0.31, "NDCG@10": 0.18}, "serving": {"HR@10": 0.29, "NDCG@10": 0.17},
                      "diff_low": -0.002, "diff_high": 0.021, "heldout": 640}}
REFUSED = {"at": 1_700_000_300.0, "published": None, "refused": "gate", "seconds": 0.4,
           "gate": {"candidate": {"NDCG@10": 0.12}, "serving": {"NDCG@10": 0.17},
                    "diff_low": -0.07, "diff_high": -0.03, "heldout": 512}}


def samples(metrics: TrainerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``render()`` by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_round_records_become_counters_gauges_and_a_histogram() -> None:
    m = TrainerMetrics()
    m.observe_round(PUBLISHED)
    m.observe_round(REFUSED)
    m.observe_round({"refused": "no-data"})  # no gate: the last gate numbers stay
    got = samples(m)
    assert got[("lrustream_trainer_rounds_total", ())] == 3
    assert got[("lrustream_trainer_published_total", ())] == 1
    assert got[("lrustream_trainer_refused_total", (("reason", "gate"),))] == 1
    assert got[("lrustream_trainer_refused_total", (("reason", "no-data"),))] == 1
    assert got[("lrustream_trainer_serving_info", (("version", "v000007"),))] == 1
    assert got[("lrustream_trainer_gate_candidate", (("metric", "NDCG@10"),))] == pytest.approx(0.12)
    assert ("lrustream_trainer_gate_candidate", (("metric", "HR@10"),)) not in got, "cleared by the next gate"
    assert got[("lrustream_trainer_gate_serving", (("metric", "NDCG@10"),))] == pytest.approx(0.17)
    assert got[("lrustream_trainer_gate_diff_low", ())] == pytest.approx(-0.07)
    assert got[("lrustream_trainer_gate_diff_high", ())] == pytest.approx(-0.03)
    assert got[("lrustream_trainer_gate_heldout_events", ())] == 512
    assert got[("lrustream_trainer_round_seconds_count", ())] == 2  # the record without "seconds" is not timed
    assert got[("lrustream_trainer_round_seconds_sum", ())] == pytest.approx(12.9)
    assert got[("lrustream_trainer_round_seconds_bucket", (("le", "0.5"),))] == 1
    assert got[("lrustream_trainer_last_round_timestamp_seconds", ())] > REFUSED["at"]  # "at" missing: now


def test_a_later_publish_replaces_the_serving_version_and_polls_are_counted() -> None:
    m, other = TrainerMetrics(), TrainerMetrics()
    m.set_version("v000006")
    m.observe_round(PUBLISHED)
    m.observe_poll(examples=3, events=11)
    m.observe_poll(examples=2, events=4)
    m.observe_buffer(users=5, events=90)
    m.observe_lag(42)
    m.observe_lag(None)
    got = samples(m)
    assert [k[1] for k in got if k[0] == "lrustream_trainer_serving_info"] == [(("version", "v000007"),)]
    assert got[("lrustream_trainer_last_round_timestamp_seconds", ())] == PUBLISHED["at"]
    assert got[("lrustream_trainer_examples_total", ())] == 5
    assert got[("lrustream_trainer_events_total", ())] == 15
    assert got[("lrustream_trainer_buffer_users", ())] == 5
    assert got[("lrustream_trainer_buffer_events", ())] == 90
    assert got[("lrustream_trainer_examples_lag", ())] == 42
    assert samples(other)[("lrustream_trainer_rounds_total", ())] == 0, "each instance has its own registry"


def test_refusals_in_a_row_count_up_until_a_publish_which_sets_the_publish_time() -> None:
    m = TrainerMetrics()
    assert samples(m)[("lrustream_trainer_refused_in_a_row", ())] == 0
    assert samples(m)[("lrustream_trainer_last_published_timestamp_seconds", ())] == 0, "nothing published yet"
    for _ in range(3):
        m.observe_round(REFUSED)
    assert samples(m)[("lrustream_trainer_refused_in_a_row", ())] == 3
    assert samples(m)[("lrustream_trainer_last_published_timestamp_seconds", ())] == 0, "refusals publish nothing"
    m.observe_round(PUBLISHED)
    assert samples(m)[("lrustream_trainer_refused_in_a_row", ())] == 0
    assert samples(m)[("lrustream_trainer_last_published_timestamp_seconds", ())] == PUBLISHED["at"]
    m.observe_round({**REFUSED, "at": PUBLISHED["at"] + 600})
    got = samples(m)
    assert got[("lrustream_trainer_refused_in_a_row", ())] == 1
    assert got[("lrustream_trainer_last_published_timestamp_seconds", ())] == PUBLISHED["at"]


def test_the_health_gauge_shows_the_reported_state_only() -> None:
    m = TrainerMetrics()
    assert samples(m)[("lrustream_trainer_health", (("state", "ok"),))] == 1
    m.set_health("degraded")
    got = samples(m)
    assert got[("lrustream_trainer_health", (("state", "ok"),))] == 0
    assert got[("lrustream_trainer_health", (("state", "degraded"),))] == 1
    with pytest.raises(ValueError, match="unknown health state"):
        m.set_health("waiting")


def test_health_is_ok_at_start_and_degraded_while_polling_fails() -> None:
    h = TrainerHealth(stall_after_s=10, progress_at=0.0)
    assert h.report(lag=0, now=1.0) == ("ok", None)
    assert h.report(lag=None, now=1000.0) == ("ok", None)
    h.poll_failed(RuntimeError("broker transport failure"), now=5.0)
    h.poll_failed(RuntimeError("broker transport failure"), now=6.0)
    status, reason = h.report(lag=None, now=8.0)
    assert status == "degraded" and reason is not None
    assert "failing for 3 s" in reason and "RuntimeError: broker transport failure" in reason
    h.polled(now=9.0)
    assert h.report(lag=None, now=9.5) == ("ok", None)


def test_examples_waiting_and_none_consumed_is_a_stall() -> None:
    h = TrainerHealth(stall_after_s=10, progress_at=100.0)
    h.polled(now=100.0, examples=4)
    assert h.report(lag=0, now=200.0)[0] == "ok", "idle because there is nothing to consume"
    assert h.report(lag=7, now=109.0)[0] == "ok", "within the limit"
    h.polled(now=150.0)  # polls succeed but bring nothing: a stuck assignment
    status, reason = h.report(lag=7, now=111.0)
    assert status == "degraded" and reason == "7 training examples waiting, none consumed for 11 s"
    h.polled(now=112.0, examples=1)
    assert h.report(lag=6, now=113.0) == ("ok", None)


def test_a_long_round_is_not_a_stall_but_a_failed_one_is_degraded_until_one_succeeds() -> None:
    h = TrainerHealth(stall_after_s=10, progress_at=0.0)
    h.round_started(now=1.0)
    assert h.report(lag=500, now=300.0)[0] == "ok", "a round in progress consumes nothing by design"
    h.round_failed(ValueError("NaN in weights"), now=301.0)
    status, reason = h.report(lag=0, now=302.0)
    assert status == "degraded" and reason == "last round failed: ValueError: NaN in weights"
    h.round_started(now=303.0)
    assert h.report(lag=0, now=304.0)[0] == "degraded", "still failed until a round completes"
    h.round_done(now=305.0)
    assert h.report(lag=3, now=306.0) == ("ok", None)


def test_health_body_maps_status_to_http_code() -> None:
    assert health_body("ok", None, rounds=2) == ({"status": "ok", "rounds": 2}, 200)
    assert health_body("degraded", "x", rounds=2) == ({"status": "degraded", "rounds": 2, "reason": "x"}, 503)


def get(url: str, token: str | None = None) -> tuple[int, bytes, str]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read(), resp.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers["Content-Type"]


@pytest.fixture
def served() -> Iterator[tuple[TrainerHttp, TrainerHealth, TrainerMetrics]]:
    health, metrics = TrainerHealth(stall_after_s=10), TrainerMetrics()
    metrics.observe_round(PUBLISHED)

    def body() -> tuple[dict[str, Any], int]:
        return health_body(*health.report(lag=None), model_version="v000007")

    http = TrainerHttp("127.0.0.1", 0, "s3cret", body, metrics.render).start()
    try:
        yield http, health, metrics
    finally:
        http.close()


def test_http_serves_health_and_guards_metrics_with_the_token(
        served: tuple[TrainerHttp, TrainerHealth, TrainerMetrics], capsys: pytest.CaptureFixture[str]) -> None:
    http, health, _ = served
    base = f"http://127.0.0.1:{http.port}"
    assert http.port > 0
    status, body, ctype = get(f"{base}/health")
    assert (status, ctype) == (200, "application/json"), "probes need no token"
    assert json.loads(body) == {"status": "ok", "model_version": "v000007"}
    health.round_failed(RuntimeError("disk full"))
    status, body, _ = get(f"{base}/health")
    assert status == 503 and json.loads(body)["reason"] == "last round failed: RuntimeError: disk full"

    assert get(f"{base}/metrics")[0] == 401
    assert get(f"{base}/metrics", token="wrong")[0] == 401
    status, body, ctype = get(f"{base}/metrics?x=1", token="s3cret")
    assert (status, ctype) == (200, CONTENT_TYPE_LATEST)
    assert b"lrustream_trainer_published_total 1.0" in body
    status, body, _ = get(f"{base}/nope", token="s3cret")
    assert status == 404 and "no such endpoint" in json.loads(body)["error"]
    req = urllib.request.Request(f"{base}/health", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 405
    assert capsys.readouterr().err == "", "no request log (the default one writes every request to stderr)"


def test_http_without_a_token_leaves_metrics_open_and_close_frees_the_port() -> None:
    http = TrainerHttp("127.0.0.1", 0, None, lambda: health_body("ok", None), lambda: b"x_total 1.0\n").start()
    port = http.port
    try:
        assert get(f"http://127.0.0.1:{port}/metrics") == (200, b"x_total 1.0\n", CONTENT_TYPE_LATEST)
    finally:
        http.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)


def test_a_failing_health_callback_answers_500_not_a_dropped_connection() -> None:
    def broken() -> tuple[dict[str, Any], int]:
        raise KeyError("buffer")

    http = TrainerHttp("127.0.0.1", 0, None, broken, lambda: b"").start()
    try:
        status, body, _ = get(f"http://127.0.0.1:{http.port}/health")
    finally:
        http.close()
    assert status == 500 and json.loads(body)["error"].startswith("KeyError")
