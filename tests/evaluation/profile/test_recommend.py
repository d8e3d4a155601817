"""Calibration: predicted speedups, and the search for α and the floor."""

from __future__ import annotations

import pytest

from d3cli.base.errors import UserError
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.evaluation.profile.recommend import candidate_schedules, layer_ratio, predicted_speedup, recommend
from d3cli.evaluation.timing import StepCosts

COSTS = StepCosts(num_layers=30, t_fixed_s=3.2e-3, t_layer_s=0.96e-3, r2=1.0, samples=())


def test_predicted_speedup_follows_the_step_cost_model():
    schedule = DecaySchedule.build(30, alpha=0.5, min_layers=15, head=2, tail=2)
    # steps 1..99 all at the floor of 15 layers
    assert predicted_speedup(schedule, 100, COSTS) == pytest.approx((3.2 + 30 * 0.96) / (3.2 + 15 * 0.96))
    assert predicted_speedup(DecaySchedule.build(30, alpha=1.0), 100, COSTS) == pytest.approx(1.0)
    assert layer_ratio(schedule, 10) == pytest.approx((30 + 9 * 15) / 300)


def test_candidates_take_the_largest_alpha_that_reaches_the_target():
    base = DecaySchedule.build(30, alpha=0.98, min_layers=24, head=2, tail=2)

    def reaches(schedule):
        return predicted_speedup(schedule, 128, COSTS) >= 1.25

    candidates = candidate_schedules(base, reaches)
    assert candidates and all(reaches(schedule) for schedule in candidates)
    for schedule in candidates:
        slightly_slower = DecaySchedule.build(30, alpha=min(1.0, schedule.alpha + 2e-4),
                                              min_layers=schedule.min_layers, head=2, tail=2)
        assert not reaches(slightly_slower)
        assert schedule.drop_order == base.drop_order
    floors = [schedule.min_layers for schedule in candidates]
    assert floors == sorted(floors) and max(floors) < 30
    assert min(floors) >= 4


def test_recommend_picks_the_candidate_with_the_smallest_nll_cost():
    base = DecaySchedule.build(30, alpha=0.98, min_layers=24, head=2, tail=2)

    def nll_of(schedules):  # pretend the model likes high floors: cost falls with the floor
        return [3.0 + (30 - schedule.min_layers) * 0.01 for schedule in schedules]

    chosen, candidates = recommend(base, 128, COSTS, 1.25, None, nll_of)
    assert chosen.min_layers == max(candidate.min_layers for candidate in candidates)
    assert chosen.predicted_nll_increase == pytest.approx((30 - chosen.min_layers) * 0.01)
    by_ratio, _ = recommend(base, 128, COSTS, None, 0.8, nll_of)
    assert by_ratio.predicted_layer_ratio <= 0.8
    with pytest.raises(UserError, match="no α and floor reach"):
        recommend(base, 128, COSTS, 50.0, None, nll_of)
    with pytest.raises(UserError, match="above 1"):
        recommend(base, 128, COSTS, 0.9, None, nll_of)
