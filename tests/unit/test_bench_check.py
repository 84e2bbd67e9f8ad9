"""bench/check.py's verdicts: ratios ours/reference against the committed ones, with a margin
from the recorded spread."""

from __future__ import annotations

from bench.check import MARGIN_FLOOR, RATIOS, compare, relative_spread

OURS, REF = RATIOS[0][1], RATIOS[0][2]
TIGHT_OURS = [100.0] * 19 + [101.0]
TIGHT_REF = [200.0] * 19 + [202.0]


def test_relative_spread_is_half_the_p5_p95_range_over_the_median() -> None:
    assert relative_spread([10.0] * 20) == 0.0
    assert relative_spread([float(v) for v in range(1, 101)]) == (95 - 5) / 2 / 50.5


def test_same_ratio_passes_and_a_doubled_one_fails() -> None:
    committed = {OURS: TIGHT_OURS, REF: TIGHT_REF}
    ((_, before, now, margin, ok),) = compare(committed, committed)
    assert ok and before == now == 0.5 and margin == MARGIN_FLOOR
    slower = {OURS: [v * 2 for v in TIGHT_OURS], REF: TIGHT_REF}
    assert not compare(committed, slower)[0][4]


def test_a_slower_machine_cancels_out_of_the_ratio() -> None:
    committed = {OURS: TIGHT_OURS, REF: TIGHT_REF}
    slow_machine = {OURS: [v * 3 for v in TIGHT_OURS], REF: [v * 3 for v in TIGHT_REF]}
    assert compare(committed, slow_machine)[0][4]


def test_the_margin_grows_with_the_recorded_noise() -> None:
    noisy = {OURS: [50.0 + 5 * i for i in range(20)], REF: TIGHT_REF}  # median 97.5
    worse = {OURS: [v * 1.25 for v in noisy[OURS]], REF: TIGHT_REF}
    ((_, _, _, margin, ok),) = compare(noisy, worse)
    assert margin > 0.25 and ok  # within what the recorded spread allows
    assert not compare({OURS: TIGHT_OURS, REF: TIGHT_REF},
                       {OURS: [v * 1.25 for v in TIGHT_OURS], REF: TIGHT_REF})[0][4]


def test_a_ratio_missing_from_either_run_is_left_out() -> None:
    assert compare({OURS: TIGHT_OURS}, {OURS: TIGHT_OURS, REF: TIGHT_REF}) == []
