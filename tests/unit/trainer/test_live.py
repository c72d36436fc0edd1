"""The live watch without a broker: live scores per version, the events a judgement needs, and the verdict of a
version against its parent (trainer/live.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lrustream.kernel.config import load_config
from trainer.live import KEPT_EVENTS, LiveWatch, Tally, events_needed, rate_and_variance


def _feed(watch: LiveWatch, version: str, rate: float, events: int, rng: np.random.Generator, chunk: int = 5) -> None:
    for k in range(events // chunk):
        watch.add(f"u{k}", {version: (chunk, int((rng.random(chunk) < rate).sum()))})


def test_a_sparse_stream_needs_more_live_events_than_a_dense_one_within_bounds() -> None:
    o = load_config().online
    dense, sparse = events_needed(0.3, o), events_needed(0.01, o)
    assert o.min_holdout <= dense < sparse <= KEPT_EVENTS
    assert sparse > 20 * dense, "about inversely proportional to the hit rate"
    assert events_needed(0.0, o) == KEPT_EVENTS, "a parent that never hit cannot be compared"
    assert events_needed(0.3, dataclasses.replace(o, detectable_drop=0.15)) > 3 * dense, "a smaller drop needs more"


def test_a_tally_keeps_its_first_and_its_last_events() -> None:
    tally = Tally()
    for k in range(10):
        tally.add(f"u{k}", 10, k)  # ten chunks of ten events; chunk k has k hits
    assert (tally.events, tally.hits) == (100, 45)
    assert tally.first(25) == [("u0", 10, 0), ("u1", 10, 1), ("u2", 10, 2)], "whole chunks, oldest first"
    assert tally.last(20) == [("u9", 10, 9), ("u8", 10, 8)]


def test_the_variance_of_a_live_hit_rate_counts_users_not_events() -> None:
    """The same 10 % hit rate over 1,000 events: spread evenly over 100 users, or 10 users who hit every time and
    90 who never do (each user's events hit or miss together). The second tells far less; and one user's events
    over several micro-batches are one user."""
    even = [(f"u{k}", 10, 1) for k in range(100)]
    bursts = [(f"u{k}", 10, 10 if k < 10 else 0) for k in range(100)]
    n_even, rate_even, var_even = rate_and_variance(even)
    n_bursts, rate_bursts, var_bursts = rate_and_variance(bursts)
    assert (n_even, rate_even) == (n_bursts, rate_bursts) == (1000, 0.1)
    assert var_even == 0.0 and var_bursts > 8 * 0.1 * 0.9 / 1000, "about ten times the variance of events"
    split = [(user, 5, h // 2) for user, _, h in bursts] * 2  # each user's events in two micro-batches
    assert rate_and_variance(split) == (1000, 0.1, pytest.approx(var_bursts))


def test_a_version_that_serves_worse_than_its_parent_is_rolled_back_once_there_is_enough_evidence() -> None:
    o = load_config().online
    rng = np.random.default_rng(0)
    watch = LiveWatch(o)
    _feed(watch, "v1", 0.30, 4000, rng)
    _feed(watch, "v2", 0.18, 100, rng)
    assert watch.judge("v2", "v1") is None, "too few events of v2 to tell"
    _feed(watch, "v2", 0.18, 4000, rng)
    verdict = watch.judge("v2", "v1")
    assert verdict is not None and verdict.roll_back and verdict.diff_high < 0, verdict
    parent = watch.tallies["v1"]
    n = events_needed(parent.hits / parent.events, o)
    assert n <= verdict.events < n + 5 and n <= verdict.parent_events < n + 5, "v2's first n, v1's last n"
    assert "serves worse than v1" in verdict.line()
    assert watch.judge("v2", "v1") is None, "judged once"


def test_a_version_as_good_as_its_parent_is_kept_and_a_small_drift_does_not_roll_it_back() -> None:
    o = load_config().online
    rng = np.random.default_rng(1)
    kept = 0
    for _ in range(20):
        watch = LiveWatch(o)
        _feed(watch, "v1", 0.30, 3000, rng)
        _feed(watch, "v2", 0.295, 3000, rng)  # a drift of under 2 %, below online.tolerance
        verdict = watch.judge("v2", "v1")
        assert verdict is not None
        kept += not verdict.roll_back
    assert kept == 20


def test_the_watch_can_be_turned_off() -> None:
    watch = LiveWatch(dataclasses.replace(load_config().online, rollback=False))
    rng = np.random.default_rng(2)
    _feed(watch, "v1", 0.5, 3000, rng)
    _feed(watch, "v2", 0.0, 3000, rng)
    assert watch.judge("v2", "v1") is None
