"""Timing: the per-position medians over rounds, the straight-line fit, step costs measured at several depths."""

from __future__ import annotations

import pytest

from d3cli.core.decode.schedule import DecaySchedule
from d3cli.evaluation.timing import fit_line, measure_step_costs, median_total


def test_a_stall_in_one_round_moves_no_median_total():
    rounds = [[0.05, 0.06, 0.05], [0.05, 3.00, 0.05], [0.05, 0.06, 0.05]]  # round 2 stalled at its second step
    assert median_total(rounds) == pytest.approx(0.16)
    with pytest.raises(ValueError):
        median_total([[0.05, 0.06], [0.05]])  # rounds that timed different steps cannot be compared


def test_fit_line_recovers_intercept_and_slope():
    intercept, slope, r2 = fit_line([(k, 0.0032 + 0.00096 * k) for k in (6, 12, 18, 24, 30)])
    assert intercept == pytest.approx(0.0032) and slope == pytest.approx(0.00096) and r2 == pytest.approx(1.0)


def test_measured_step_costs_are_positive_and_cover_the_depths(tiny_models):
    base = DecaySchedule.build(8, alpha=0.9, min_layers=3, head=1, tail=1)
    costs = measure_step_costs(tiny_models["llama"], [1, 4093, 314, 260], base, tokens=6, repeats=1)
    assert [layers for layers, _ in costs.samples] == [2, 3, 5, 6, 8]
    assert all(seconds > 0 for _, seconds in costs.samples)
    assert costs.t_layer_s > 0 and costs.t_fixed_s >= 0
