"""The trainer's operator page: :func:`trainer.page.render_page` on plain dicts (escaping, the empty state, rounds
with their figures), and the page as a real headless Chromium renders it from a running ``TrainerHttp`` whose page
comes from ``TrainerLoop.page_state`` over stubs (no broker).

The browser test skips when no Chromium is installed, except under ``CI``, where it fails: the page must be
checked in a browser there."""

from __future__ import annotations

import json
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lrustream.kernel.config import load_config
from tests import browser
from trainer.live import LiveWatch
from trainer.page import curve_points, render_page

TOKEN = "page-token"
ROUNDS = [
    {"at": 1_700_000_000.0, "published": "v000007", "refused": None, "reason": "", "new_events": 900,
     "seconds": 12.5, "candidate": {"HR@10": 0.31, "NDCG@10": 0.1834}, "serving": {"HR@10": 0.29, "NDCG@10": 0.1702},
     "gate": {"diff_low": 0.0021, "diff_high": 0.0213, "heldout": 640}},
    {"at": 1_700_000_300.0, "published": None, "refused": "gate", "reason": "candidate worse <by far>",
     "new_events": 450, "seconds": 0.4, "candidate": {"HR@10": 0.22, "NDCG@10": 0.1201},
     "serving": {"HR@10": 0.31, "NDCG@10": 0.1834}, "gate": {"diff_low": -0.07, "diff_high": -0.03, "heldout": 512}},
    {"at": 1_700_000_400.0, "published": None, "refused": "no-data", "reason": "no new events", "new_events": 0},
]


def test_an_empty_trainer_says_no_round_yet_and_unknown_lag() -> None:
    page = render_page({"serving": None, "rounds": [], "live": {}, "lag": None, "health": {"status": "ok"}})
    assert page.startswith("<!DOCTYPE html>")
    assert "no round yet" in page and "<polyline" not in page
    assert "Consumer lag: not known yet" in page and "no live events scored yet" in page
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_outside_values_are_escaped() -> None:
    evil = "<script>alert('x')</script>"
    page = render_page({"serving": evil, "shadow": evil, "health": {"status": "degraded", "reason": evil},
                        "rounds": [{"refused": evil, "reason": evil}], "live": {evil: {"events": 2, "hits": 1}}})
    assert "<script" not in page
    assert page.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;") == 6


def test_rounds_are_shown_newest_first_with_their_gate_figures_and_a_curve() -> None:
    page = render_page({"serving": "v000007", "current": "v000007", "pinned": None, "shadow": "v000009",
                        "rounds": ROUNDS, "live": {"v000007": {"events": 200, "hits": 50}}, "lag": 17,
                        "health": {"status": "ok"}})
    assert '<td class="l" id="version-serving"><code>v000007</code>' in page
    assert '<td class="l" id="version-pinned"><span class="none">none</span>' in page
    assert "published v000007" in page and "refused: gate" in page and "refused: no-data" in page
    assert page.index("refused: no-data") < page.index("refused: gate") < page.index("published v000007")
    assert "candidate worse &lt;by far&gt;" in page
    for figure in ("640", "512", "0.1834", "0.1702", "0.1201", "[0.0021, 0.0213]", "[-0.0700, -0.0300]"):
        assert figure in page
    assert '<b id="lag">17</b>' in page
    assert "<td>200</td><td>50</td><td>0.2500</td>" in page  # live events, hits, HR@K
    assert page.count("<polyline") == 2  # candidate and serving; the round without figures is not on it


def test_curve_points_span_the_canvas_and_skip_missing_values() -> None:
    assert curve_points([0.2, None, 0.4]) == "30.0,100.0 610.0,30.0"
    assert curve_points([float("nan")]) == ""
    assert curve_points([0.0]) == "30.0,170.0"


def test_recent_rounds_reads_the_tail_of_rounds_jsonl_and_skips_a_torn_line(tmp_path: Path) -> None:
    from trainer.online import recent_rounds

    assert list(recent_rounds(tmp_path / "absent.jsonl")) == []
    path = tmp_path / "rounds.jsonl"
    path.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(30)) + '{"n": 30, "pub')
    assert [r["n"] for r in recent_rounds(path, keep=5)] == [25, 26, 27, 28, 29]
    assert [r["n"] for r in recent_rounds(path, keep=3, tail_bytes=40)] == [28, 29]  # the cut line is dropped


# ----- in a browser ----------------------------------------------------------------------------------------------
def test_a_missing_browser_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        browser.chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        browser.chromium()


def stub_loop(tmp_path: Path) -> types.SimpleNamespace:
    """The attributes ``TrainerLoop.page_state`` and ``health_report`` read, without Kafka: a store with its
    pointers, rounds.jsonl read back as at start-up, a LiveWatch fed two examples."""
    from trainer.online import TrainerLoop, recent_rounds
    from trainer.service import TrainerHealth, TrainerMetrics

    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROUNDS))
    live = LiveWatch(load_config().online)
    live.add("u1", {"v000006": (40, 8), "v000007": (30, 9)})
    live.add("u2", {"v000007": (10, 3)})
    loop = types.SimpleNamespace(
        health=TrainerHealth(), metrics=TrainerMetrics(), lag=5, learner=types.SimpleNamespace(version="v000007"),
        buffer=types.SimpleNamespace(new_events=12, users={"u1": None}), live=live,
        store=types.SimpleNamespace(current=lambda: "v000007", pinned=lambda: None, shadow=lambda: "v000009"),
        recent_rounds=recent_rounds(tmp_path / "rounds.jsonl"))
    for name in ("health_report", "page_state", "render_page"):
        setattr(loop, name, types.MethodType(getattr(TrainerLoop, name), loop))
    return loop


def test_the_page_in_a_headless_browser(tmp_path: Path) -> None:
    from trainer.service import TrainerHttp, TrainerMetrics

    browser.chromium()
    loop = stub_loop(tmp_path)
    # The page is guarded like /metrics; a browser cannot send a bearer header on the command line, so it gets
    # the page from a second server without a token, after the guarded one is shown to refuse and to serve.
    guarded = TrainerHttp("127.0.0.1", 0, TOKEN, loop.health_report, TrainerMetrics().render, loop.render_page).start()
    http = TrainerHttp("127.0.0.1", 0, None, loop.health_report, TrainerMetrics().render, loop.render_page).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{guarded.port}/", timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(f"http://127.0.0.1:{guarded.port}/",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            assert "published v000007" in response.read().decode()

        dom, _ = browser.render(f"http://127.0.0.1:{http.port}/", tmp_path, "operator-page.png")
    finally:
        http.close()
        guarded.close()
    assert '<td class="l" id="version-serving"><code>v000007</code></td>' in dom
    assert '<td class="l" id="version-shadow"><code>v000009</code></td>' in dom
    assert "published v000007" in dom and "refused: gate" in dom
    assert "<td>640</td>" in dom and "0.1834" in dom
    assert '<b id="lag">5</b>' in dom
    assert "<td>40</td><td>12</td><td>0.3000</td>" in dom  # v000007's live tally over both examples
    assert 'id="curve-candidate"' in dom
