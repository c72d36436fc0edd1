"""The trainer's operator page, ``GET /``: one self-contained HTML document (no script, no external CSS or font,
so it works on a host without internet and leaks nothing to a CDN) built by :func:`render_page` from a plain dict.

The dict (``TrainerLoop.page_state`` gathers it; tests hand one in directly)::

    serving, current, pinned, shadow   version names or None (the model store's pointers; serving = pin or current)
    rounds     round records as written to rounds.jsonl, oldest first (any key may be missing)
    live       {version: {"events": int, "hits": int}}: the live tallies of trainer/live.py's LiveWatch
    lag        training examples in the topic not yet consumed, or None when unknown
    health     {"status": "ok" | "degraded", "reason"?: str}
    now        Unix time the page was built

Every value from outside (version names, refusal reasons) passes through :func:`html.escape`.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

ROUNDS_SHOWN = 20  # rows of the rounds table and points of the curve
CHART_W, CHART_H, CHART_PAD = 640, 200, 30

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}.published{color:#086b2c;font-weight:bold}.refused{color:#a33}
.ok{color:#086b2c}.degraded{color:#a33;font-weight:bold}.none{color:#777;font-style:italic}
svg{background:#fff;border:1px solid #ccc}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _version(value: Any) -> str:
    return f"<code>{_e(value)}</code>" if value else '<span class="none">none</span>'


def _num(value: Any, digits: int = 4) -> str:
    """A figure for a table cell: a finite number rounded, anything else a dash."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "&ndash;"
    if not math.isfinite(x):
        return "&ndash;"
    return f"{x:.0f}" if x == int(x) and digits == 0 else f"{x:.{digits}f}"


def _side(entry: Mapping[str, Any], side: str) -> Mapping[str, Any]:
    """A round's candidate or serving holdout metrics: the record's own key, else the gate's (both spellings
    occur: RoundResult.record writes them at the top level, older tools nested them in ``gate``)."""
    for source in (entry, entry.get("gate") or {}):
        if isinstance(values := source.get(side), Mapping) and values:
            return values
    return {}


def _when(at: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(at)))
    except (TypeError, ValueError, OverflowError, OSError):
        return "&ndash;"


def _versions(state: Mapping[str, Any]) -> str:
    rows = [("serving", state.get("serving")), ("@current", state.get("current")), ("pinned", state.get("pinned")),
            ("shadow", state.get("shadow"))]
    body = "".join(f'<tr><th class="l">{name}</th><td class="l" id="version-{name.strip("@")}">{_version(v)}</td></tr>'
                   for name, v in rows)
    return f"<h2>Versions</h2><table>{body}</table>"


def _rounds(rounds: Sequence[Mapping[str, Any]]) -> str:
    if not rounds:
        return '<h2>Rounds</h2><p class="none" id="no-rounds">no round yet</p>'
    head = ("<tr><th class=\"l\">ended</th><th class=\"l\">decision</th><th class=\"l\">reason</th>"
            "<th>held-out events</th><th>candidate NDCG@10</th><th>serving NDCG@10</th>"
            "<th>difference interval</th><th>new events</th><th>seconds</th></tr>")
    rows = []
    for r in reversed(rounds[-ROUNDS_SHOWN:]):  # newest first
        gate = r.get("gate") or {}
        if r.get("published"):
            decision = f'<span class="published">published {_e(r["published"])}</span>'
        else:
            decision = f'<span class="refused">refused: {_e(r.get("refused") or "?")}</span>'
        interval = (f"[{_num(gate.get('diff_low'))}, {_num(gate.get('diff_high'))}]"
                    if "diff_low" in gate or "diff_high" in gate else "&ndash;")
        rows.append(f'<tr class="round"><td class="l">{_when(r.get("at"))}</td><td class="l">{decision}</td>'
                    f'<td class="l">{_e(r.get("reason") or "")}</td><td>{_num(gate.get("heldout"), 0)}</td>'
                    f'<td>{_num(_side(r, "candidate").get("NDCG@10"))}</td>'
                    f'<td>{_num(_side(r, "serving").get("NDCG@10"))}</td><td>{interval}</td>'
                    f'<td>{_num(r.get("new_events"), 0)}</td><td>{_num(r.get("seconds"), 1)}</td></tr>')
    return (f"<h2>Rounds (last {min(len(rounds), ROUNDS_SHOWN)}, newest first)</h2>"
            f'<table id="rounds">{head}{"".join(rows)}</table>')


def _live(live: Mapping[str, Mapping[str, Any]]) -> str:
    if not live:
        return '<h2>Live hit rate</h2><p class="none">no live events scored yet</p>'
    rows = []
    for version, tally in live.items():
        events, hits = int(tally.get("events") or 0), int(tally.get("hits") or 0)
        rate = _num(hits / events) if events else "&ndash;"
        rows.append(f'<tr><td class="l">{_version(version)}</td><td>{events}</td><td>{hits}</td><td>{rate}</td></tr>')
    return ('<h2>Live hit rate</h2><table id="live"><tr><th class="l">version</th><th>events</th><th>hits</th>'
            f'<th>HR@K</th></tr>{"".join(rows)}</table>')


def curve_points(values: Sequence[float | None]) -> str:
    """SVG polyline points for ``values`` (one per round, oldest first) on a CHART_W x CHART_H canvas, y from 0 to
    the largest value; missing or non-finite values leave no point."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top = max(finite, default=0.0) or 1.0
    step = (CHART_W - 2 * CHART_PAD) / max(len(values) - 1, 1)
    points = []
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v):
            continue
        x = CHART_PAD + i * step
        y = CHART_H - CHART_PAD - (v / top) * (CHART_H - 2 * CHART_PAD)
        points.append(f"{x:.1f},{y:.1f}")
    return " ".join(points)


def _figure(entry: Mapping[str, Any], side: str, metric: str) -> float | None:
    try:
        return float(_side(entry, side)[metric])
    except (KeyError, TypeError, ValueError):
        return None


def _curve(rounds: Sequence[Mapping[str, Any]]) -> str:
    """Held-out HR@10 of the candidate and of the serving version, round by round: how the online model's hit
    rate moves as it learns, and against what it was judged."""
    shown = [r for r in rounds[-ROUNDS_SHOWN:] if _side(r, "candidate") or _side(r, "serving")]
    title = "<h2>Hit-rate curve (held-out HR@10 per round)</h2>"
    if not shown:
        return title + '<p class="none">no round with gate figures yet</p>'
    candidate = [_figure(r, "candidate", "HR@10") for r in shown]
    serving = [_figure(r, "serving", "HR@10") for r in shown]
    top = max((v for v in candidate + serving if v is not None and math.isfinite(v)), default=0.0)
    base = CHART_H - CHART_PAD
    axes = (f'<line x1="{CHART_PAD}" y1="{base}" x2="{CHART_W - CHART_PAD}" y2="{base}" stroke="#999"/>'
            f'<line x1="{CHART_PAD}" y1="{CHART_PAD}" x2="{CHART_PAD}" y2="{base}" stroke="#999"/>'
            f'<text x="2" y="{CHART_PAD + 4}" font-size="11">{top:.3f}</text>'
            f'<text x="2" y="{base + 4}" font-size="11">0</text>'
            f'<text x="{CHART_PAD}" y="{CHART_H - 8}" font-size="11">oldest round</text>'
            f'<text x="{CHART_W - CHART_PAD - 70}" y="{CHART_H - 8}" font-size="11">newest round</text>')
    lines = (f'<polyline id="curve-candidate" fill="none" stroke="#1f6fd1" stroke-width="2" '
             f'points="{curve_points(candidate)}"/>'
             f'<polyline id="curve-serving" fill="none" stroke="#d17a1f" stroke-width="2" stroke-dasharray="5,3" '
             f'points="{curve_points(serving)}"/>')
    legend = ('<p><span style="color:#1f6fd1">&#9644; candidate</span> '
              '<span style="color:#d17a1f">&#9644; serving</span></p>')
    return (f'{title}<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{CHART_H}" '
            f'viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="held-out HR@10 per round">{axes}{lines}</svg>'
            f"{legend}")


def render_page(state: Mapping[str, Any]) -> str:
    """The operator page as an HTML string (see the module docstring for ``state``)."""
    health = state.get("health") or {}
    status = str(health.get("status") or "unknown")
    reason = f" &mdash; {_e(health['reason'])}" if health.get("reason") else ""
    lag = state.get("lag")
    lag_line = (f"<p>Training examples not yet consumed: <b id=\"lag\">{_e(lag)}</b></p>" if lag is not None
                else '<p class="none">Consumer lag: not known yet</p>')
    rounds = list(state.get("rounds") or [])
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>lrustream trainer</title>"
            f"<style>{STYLE}</style></head><body><h1>lrustream trainer</h1>"
            f'<p>Health: <span class="{_e(status)}" id="health">{_e(status)}</span>{reason}. '
            f"Page built {_when(state.get('now', time.time()))}; reload to refresh.</p>{lag_line}"
            f"{_versions(state)}{_rounds(rounds)}{_curve(rounds)}{_live(state.get('live') or {})}"
            "</body></html>")
