"""How long a calibration takes (evaluation/calibrate/estimate.py): each stage's estimate, a `--time-limit` read as a
duration, and the smaller calibration that fits it, with what that costs."""

from __future__ import annotations

import dataclasses

import pytest

from d3cli.base.errors import UserError
from d3cli.evaluation.calibrate.estimate import StageCosts, estimate_from, parse_duration
from d3cli.evaluation.calibrate.options import CalibrationOptions
from d3cli.evaluation.calibrate.schedule_choice import expected_replies

COSTS = dict(step_s=0.05, forward_s=0.2, num_layers=32)  # a 7B model's on a CPU, roughly


def test_a_time_limit_cuts_prompts_texts_and_held_out_prompts_by_one_fraction_and_says_what_that_costs():
    from dataclasses import replace

    from d3cli.evaluation.calibrate.estimate import StageCosts, estimate_from, time_limit_cost, within_time
    from d3cli.evaluation.calibrate.options import CalibrationOptions

    costs, options = StageCosts(**COSTS), CalibrationOptions()
    full = sum(estimate_from(costs, options).values())
    assert within_time(costs, options, full * 1.01) == options  # fits: unchanged
    smallest = sum(estimate_from(costs, replace(options, prompts=8, profile_texts=4, schedule_prompts=4)).values())
    limit = smallest + (full - smallest) / 2
    limited = within_time(costs, options, limit)
    assert sum(estimate_from(costs, limited).values()) <= limit
    fractions = [limited.prompts / 64, limited.profile_texts / options.profile_texts,
                 limited.schedule_prompts / options.schedule_prompts]
    assert all(0 < fraction < 1 for fraction in fractions)
    assert max(fractions) - min(fractions) < 0.1  # one fraction for all three (each rounded)
    assert (limited.reply_tokens, limited.batch_size, limited.budget) == (options.reply_tokens, options.batch_size,
                                                                          options.budget)
    cost = time_limit_cost(options, limited)
    assert f"{limited.prompts} of 64 prompts the bridges are fitted on" in cost and "less certain" in cost
    assert time_limit_cost(options, options) == ""


def test_a_time_limit_below_the_smallest_calibration_is_one_line_naming_what_would_fit():
    from d3cli.base.errors import UserError
    from d3cli.evaluation.calibrate.estimate import StageCosts, within_time
    from d3cli.evaluation.calibrate.options import CalibrationOptions

    with pytest.raises(UserError, match=r"--time-limit 60 s: even the smallest calibration \(8 prompts, 4 profile "
                                        r"texts, 4 schedule prompts\) takes about \d+ min here: give at least"):
        within_time(StageCosts(**COSTS), CalibrationOptions(), 60)


def test_each_stage_is_estimated_from_the_step_and_forward_costs():
    costs = StageCosts(**COSTS)
    options = CalibrationOptions(prompts=10, reply_tokens=100, batch_size=4, profile_texts=16, head=2, tail=2,
                                 schedule_prompts=6, schedule_tokens=64)
    estimate = estimate_from(costs, options)
    assert list(estimate) == ["corpus", "profile", "bridges", "schedule"]
    assert estimate["corpus"] == pytest.approx(3 * 100 * 0.05)  # 3 batches of 4, 4, 2 replies, 100 steps each
    assert estimate["profile"] == pytest.approx(10 * (32 / 2 + 1) * 0.2)  # no more texts than prompts
    assert estimate["bridges"] == pytest.approx(10 * 0.2)
    assert estimate["schedule"] == pytest.approx(expected_replies(6, 28) / 4 * 64 * 0.05)  # in batches of 4
    assert estimate_from(costs, options, schedule_only=True) == {"schedule": estimate["schedule"]}
    doubled = estimate_from(costs, dataclasses.replace(options, reply_tokens=200, schedule_tokens=128))
    assert (doubled["corpus"], doubled["schedule"]) == pytest.approx((2 * estimate["corpus"],
                                                                      2 * estimate["schedule"]))


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400),
                                           ("1.5h", 5400), (" 2h 5s ", 7205), ("0.5s", 0.5), ("1h30", 5400),
                                           ("2m30", 150)])
def test_a_time_limit_is_a_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text, message", [
    ("soon", "--time-limit takes a duration such as 90s, 30m, 2h or 1h30m, not 'soon'"),
    ("", "--time-limit takes a duration such as 90s, 30m, 2h or 1h30m, not ''"),
    ("h", "--time-limit takes a duration such as 90s, 30m, 2h or 1h30m, not 'h'"),
    ("30m2h", "--time-limit takes a duration such as 90s, 30m, 2h or 1h30m, not '30m2h'"),
    ("0m", "--time-limit must be above zero, not '0m'"),
])
def test_a_time_limit_that_is_not_a_duration_is_one_sentence(text, message):
    with pytest.raises(UserError) as raised:
        parse_duration(text)
    assert str(raised.value) == message
