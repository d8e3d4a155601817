"""The per-position statistics and the power-law fit, on planted data."""

from __future__ import annotations

import math
import random

import pytest

from d3cli.evaluation.profile.perplexity import buckets, fit_power_law, fit_profile


@pytest.mark.parametrize("a, b, c", [(12.0, 0.6, 3.0), (40.0, 1.3, 1.5), (5.0, 0.25, 8.0)])
def test_the_fit_recovers_a_planted_power_law(a, b, c):
    positions = list(range(200))
    values = [c + a * (i + 1) ** (-b) for i in positions]
    fit = fit_power_law(positions, values)
    assert fit.a == pytest.approx(a, rel=1e-3)
    assert fit.b == pytest.approx(b, rel=1e-3)
    assert fit.c == pytest.approx(c, rel=1e-3)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert fit.predict(9) == pytest.approx(c + a * 10 ** (-b), rel=1e-6)


def test_the_fit_survives_noise_and_reports_a_lower_r2():
    rng = random.Random(1)
    positions = list(range(256))
    values = [2.0 + 10.0 * (i + 1) ** (-0.8) + rng.gauss(0, 0.05) for i in positions]
    fit = fit_power_law(positions, values)
    assert fit.a == pytest.approx(10.0, rel=0.1)
    assert fit.b == pytest.approx(0.8, rel=0.1)
    assert fit.c == pytest.approx(2.0, abs=0.1)
    assert 0.9 < fit.r2 < 1.0


def test_weights_decide_which_points_the_fit_follows():
    positions = [0, 1, 2, 3, 4, 5]
    values = [10.0, 6.0, 4.0, 3.0, 2.5, 50.0]  # a wild last point
    heavy = fit_power_law(positions, values, weights=[100, 100, 100, 100, 100, 1e-9])
    assert heavy.predict(5) < 5


def test_a_fit_needs_three_positions():
    with pytest.raises(ValueError):
        fit_power_law([0, 1], [2.0, 1.0])
    assert fit_profile([[1.0, 2.0]]) is None
    planted = [[math.log(2.0 + 6.0 * (i + 1) ** -0.7) for i in range(40)] for _ in range(3)]
    fit = fit_profile(planted)
    assert (fit.a, fit.b, fit.c) == pytest.approx((6.0, 0.7, 2.0), rel=1e-3)


def test_buckets_average_the_right_tokens():
    per_text = [[3.0, 2.0, 1.0, 1.0], [1.0, 2.0], [2.0, 2.0, 3.0]]
    stats = buckets(per_text, bucket_size=1)
    assert [stat.count for stat in stats] == [3, 3, 2, 1]
    assert stats[0].mean_nll == pytest.approx(2.0)
    assert stats[0].nll_high - 2.0 == pytest.approx(1.959963984540054 * 1.0 / math.sqrt(3))  # sample std 1
    assert stats[0].perplexity == pytest.approx(math.exp(2.0))
    rows = buckets(per_text, bucket_size=2)
    assert [(row.first, row.last, row.count) for row in rows] == [(0, 1, 6), (2, 3, 3)]
    assert rows[0].mean_nll == pytest.approx(2.0)
    values = [3.0, 2.0, 1.0, 2.0, 2.0, 2.0]
    half = 1.959963984540054 * math.sqrt(sum((v - 2.0) ** 2 for v in values) / 5) / math.sqrt(6)
    assert (rows[0].nll_low, rows[0].nll_high) == pytest.approx((2.0 - half, 2.0 + half))
    assert buckets(per_text, bucket_size=2, max_positions=3)[-1].last == 2
    single = buckets([[4.0]], bucket_size=8)[0]
    assert single.nll_low == single.nll_high == 4.0
