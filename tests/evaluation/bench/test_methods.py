"""`d3 bench`'s methods (evaluation/bench/methods.py): their order and matching, and baselines matched to D3's mean
depth."""

from __future__ import annotations

import pytest

from d3cli.base.errors import UserError
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.evaluation.bench.methods import (
    DEFAULT_METHODS,
    default_methods,
    matched_linear,
    matched_static,
    method_runs,
)


def test_methods_run_full_first_then_d3_then_the_baselines():
    runs = method_runs(("full", "d3", "static", "linear"), (0.98, 0.9))
    assert [run.key for run in runs] == ["full", "d3@0.98", "d3@0.9", "static@0.98", "linear@0.98", "static@0.9",
                                         "linear@0.9"]
    assert [run.key for run in method_runs(("full", "d3"), (0.9,))] == ["full", "d3@0.9"]
    assert [run.key for run in method_runs(("full", "d3", "static"), (1.0,))] == ["full"]  # α 1 is full depth
    with pytest.raises(UserError, match="add d3"):
        method_runs(("full", "static"), (0.9,))
    with pytest.raises(UserError, match="unknown method"):
        method_runs(("full", "early-exit"), (0.9,))


def test_bridged_methods_run_beside_the_plain_ones_and_match_their_own_d3():
    runs = method_runs(DEFAULT_METHODS, (0.98,))
    assert [run.key for run in runs] == ["full", "d3@0.98", "d3+bridges@0.98", "static@0.98",
                                         "static+bridges@0.98", "linear@0.98"]
    assert [run.label for run in runs][2] == "d3+bridges α=0.98"
    with pytest.raises(UserError, match=r"static\+bridges is matched to a d3\+bridges run"):
        method_runs(("full", "d3", "static+bridges"), (0.9,))
    plain = DecaySchedule.build(8, alpha=0.9, min_layers=3, head=1, tail=1)
    assert default_methods(plain) == ("full", "d3", "static", "linear")
    assert default_methods(plain.with_bridge_maps({(3, 4): object()})) == DEFAULT_METHODS


def records_for(schedule, lengths):
    return [{"tokens": n, "layers": [schedule.layers_at(i) for i in range(n)]} for n in lengths]


@pytest.mark.parametrize("alpha", [0.9, 0.95, 0.98])
def test_baselines_match_the_d3_runs_mean_depth(alpha):
    d3 = DecaySchedule.build(30, alpha=alpha, min_layers=12, head=2, tail=2)
    lengths = [40, 120, 7, 256, 64]
    records = records_for(d3, lengths)
    target = sum(sum(r["layers"]) for r in records) / sum(lengths)
    static = matched_static(d3, records)
    linear = matched_linear(d3, records)
    for baseline, tolerance in ((static, 0.5), (linear, 0.05)):
        achieved = sum(sum(r["layers"]) for r in records_for(baseline, lengths)) / sum(lengths)
        assert abs(achieved - target) <= tolerance, (baseline.method, achieved, target)
    assert static.layers_at(0) == 30 and len({static.layers_at(i) for i in range(1, 50)}) == 1
    depths = [linear.layers_at(i) for i in range(300)]
    assert depths[0] == 30 and depths == sorted(depths, reverse=True) and depths[-1] >= 4
    assert set(static.kept_layers(5)) <= set(static.kept_layers(1))  # same skip order, nested
