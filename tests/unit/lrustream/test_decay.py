"""The frozen model's decay table (``lrustream.decay``): a change of mix is told apart from a stale model, new
items and users are counted, and a shift of what is popular shows in the popularity recommenders."""

from __future__ import annotations

import pytest

from lrustream.decay import decay_lines, decompose

LENGTH_OF_BIN = {0: 5, 1: 20, 2: 100, 3: 300}  # a history length in each of the strata of HISTORY_BINS


def _shifting_mix(hit_of_bin: dict[int, float]) -> tuple[list, list, list]:
    """Eight eighths of 100 events each, every event from a fresh user whose warm history puts it in a stratum;
    later eighths hold more long histories; within a stratum the hit rate is ``hit_of_bin``'s, all along (a model
    that does not change, on events that get harder)."""
    warm, scored, hits = [], [], []
    for eighth in range(8):
        counts = {0: 40 - 5 * eighth, 1: 30 - 2 * eighth, 2: 20 + 2 * eighth, 3: 10 + 5 * eighth}
        for bin_, count in counts.items():
            for n in range(count):
                user = f"u{eighth}-{bin_}-{n}"
                warm += [(user, "w")] * LENGTH_OF_BIN[bin_]
                scored.append((user, "w"))
                hits.append(1.0 if n < round(count * hit_of_bin[bin_]) else 0.0)
    return warm, scored, hits


def test_a_change_of_mix_leaves_the_first_mix_figure_flat_while_the_plain_one_falls() -> None:
    warm, scored, hits = _shifting_mix({0: 0.6, 1: 0.4, 2: 0.2, 3: 0.1})
    rows = decompose(warm, scored, hits)
    assert rows["hr10"][0] > rows["hr10"][-1] + 0.15  # the plain hit rate decays
    assert rows["history"][0] < rows["history"][-1]
    assert all(abs(v - rows["hr10"][0]) < 0.01 for v in rows["hr10_first_mix"])  # the mix explains all of it


def test_a_stratum_missing_later_is_left_out_unless_it_held_most_of_the_first_mix() -> None:
    short = [(f"s{n}", "w") for n in range(40)]  # users with one warm event: the shortest stratum
    warm = [("a", "w")] * 300 + short + [("b", "w")] * 60
    # first eighth: 3 short-history events (hit) and 1 of a (300 earlier events, miss); later eighths lack the
    # short stratum: a's stratum alone stands for the first mix, its hit rate as it is there
    scored = [("s0", "w"), ("s1", "w"), ("s2", "w"), ("a", "w")] + [("a", "w")] * 28
    hits = [1.0, 1.0, 1.0, 0.0] + [1.0, 0.0, 0.0, 0.0] * 7
    rows = decompose(warm, scored, hits)
    assert rows["hr10_first_mix"][0] == pytest.approx(0.75)
    assert rows["hr10_first_mix"][1:] == [None] * 7, "the short stratum held 3/4 of the first mix"
    # the other way round: a's stratum is the missing quarter, the short one stands for the rest
    scored = [("a", "w"), ("s0", "w"), ("s1", "w"), ("s2", "w")] + [(f"s{3 + n}", "w") for n in range(28)]
    rows = decompose(warm, scored, [0.0, 1.0, 1.0, 1.0] + [1.0, 0.0, 1.0, 1.0] * 7)
    assert rows["hr10_first_mix"][1:] == [pytest.approx(0.75)] * 7


def test_a_stale_model_falls_at_the_first_mix_too() -> None:
    warm = [(f"u{n}", f"i{n % 7}") for n in range(200)]
    scored = [(f"u{n % 200}", f"i{n % 7}") for n in range(800)]  # the same kind of event all along
    hits = [1.0 if n % 100 < 50 - 5 * (n // 100) else 0.0 for n in range(800)]  # 0.5 falling to 0.15
    rows = decompose(warm, scored, hits)
    assert rows["hr10_first_mix"][0] == pytest.approx(0.5)
    assert rows["hr10_first_mix"][-1] == pytest.approx(0.15)
    assert rows["new_item"] == [0.0] * 8 and rows["new_user"] == [0.0] * 8


def test_new_items_and_users_and_a_popularity_shift_are_measured() -> None:
    warm = [(f"u{n}", f"old{n % 20}") for n in range(400)]
    # the replay's users are new and (after the first eighth) ask for items the warm half never saw
    scored = [(f"v{n}", "old0" if n < 100 else f"new{n % 3}") for n in range(800)]
    rows = decompose(warm, scored, [0.0] * 800)
    assert rows["new_user"] == [1.0] * 8
    assert rows["new_item"][0] == 0.0 and rows["new_item"][1:] == [1.0] * 7
    assert rows["pop_warm"][0] == 1.0  # old0 is in the warm top ten
    assert rows["pop_warm"][2:] == [0.0] * 6  # the new items never are
    assert rows["pop_recent"][2:] == [1.0] * 6  # three new items, each in the previous eighth's top ten
    assert rows["hr10_known"][1:] == [None] * 7


def test_the_popularity_recommenders_skip_what_the_user_has_seen() -> None:
    warm = [("c", f"i{n}") for n in range(10) for _ in range(3)] + [("a", f"i{n}") for n in range(10)]
    warm += [("b", f"i{n}") for n in range(10, 20)]  # i0..i9 four times each, then i10..i19 once each
    # i10 is eleventh: in the top ten of user a, who has seen the first ten, not in that of a new user d;
    # and once a has seen it, it is not shown to a again
    scored = [("d", "i10"), ("a", "i10"), ("a", "i10")] + [("e", "x")] * 5
    rows = decompose(warm, scored, [0.0] * 8)
    assert rows["pop_warm"][:3] == [0.0, 1.0, 0.0]


def test_lengths_must_match_and_lines_print_every_key() -> None:
    with pytest.raises(ValueError, match="hits"):
        decompose([], [("u", "i")], [])
    warm, scored, hits = _shifting_mix({0: 0.6, 1: 0.4, 2: 0.2, 3: 0.1})
    lines = decay_lines(decompose(warm, scored, hits), "  ")
    assert len(lines) == 8 and all(line.startswith("  ") for line in lines)
    assert lines[0].split()[-8:][0] == f"{sum(hits[:100]) / 100:.3f}"
