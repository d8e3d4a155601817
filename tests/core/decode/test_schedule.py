import math

import pytest

from d3cli.base.errors import UserError
from d3cli.core.decode.schedule import (
    DecaySchedule,
    drop_late_first,
    drop_middle_first,
    parse_layer_count,
    resolve_layer_count,
)


def test_layer_count_follows_the_formula_with_floor():
    schedule = DecaySchedule.build(30, alpha=0.9, min_layers=10, head=2, tail=2)
    # floor(30 * 0.9**i) = 30, 27, 24, 21, 19, 17, 15, 14, 12, 11, 10, 9 -> floor 10
    expected = [30, 27, 24, 21, 19, 17, 15, 14, 12, 11, 10, 10, 10, 10]
    assert [schedule.layers_at(i) for i in range(len(expected))] == expected
    for i in range(200):
        assert schedule.layers_at(i) == max(10, min(30, math.floor(30 * 0.9**i)))


def test_alpha_one_and_full_floor_keep_every_layer():
    for schedule in (DecaySchedule.build(12, alpha=1.0, min_layers=4, head=1, tail=1),
                     DecaySchedule.build(12, alpha=0.5, min_layers=12, head=1, tail=1)):
        assert schedule.is_full_depth()
        assert all(schedule.kept_layers(i) == tuple(range(12)) for i in range(100))


def test_warmup_delays_the_decay():
    schedule = DecaySchedule.build(20, alpha=0.5, min_layers=4, warmup=3, head=1, tail=1)
    assert [schedule.layers_at(i) for i in range(7)] == [20, 20, 20, 20, 10, 5, 4]


def test_first_token_runs_every_layer():
    for alpha in (0.5, 0.9, 0.99):
        schedule = DecaySchedule.build(16, alpha=alpha, min_layers=4, head=1, tail=1)
        assert schedule.kept_layers(0) == tuple(range(16))


@pytest.mark.parametrize("order", ["middle", "late"])
@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.95])
def test_kept_sets_nest_keep_core_layers_and_have_k_layers(order, alpha):
    schedule = DecaySchedule.build(24, alpha=alpha, min_layers=5, head=2, tail=3, skip_order=order)
    previous = set(range(24))
    for i in range(120):
        kept = schedule.kept_layers(i)
        assert list(kept) == sorted(kept)
        assert len(kept) == schedule.layers_at(i)
        assert set(kept) <= previous, f"step {i} runs a layer that step {i - 1} skipped"
        assert {0, 1, 21, 22, 23} <= set(kept)
        previous = set(kept)


def test_middle_order_drops_the_centre_of_the_flex_range_first():
    assert drop_middle_first(list(range(2, 9))) == [5, 6, 4, 7, 3, 8, 2]
    assert drop_middle_first(list(range(1, 9))) == [5, 4, 6, 3, 7, 2, 8, 1]
    schedule = DecaySchedule.build(10, alpha=0.5, min_layers=2, head=1, tail=1)
    # k_1 = floor(10 * 0.5) = 5: the five flex layers nearest the centre (5, 4, 6, 3, 7) are gone
    assert schedule.kept_layers(1) == (0, 1, 2, 8, 9)
    assert schedule.kept_layers(2) == (0, 9)  # k_2 = floor(10 * 0.25) = 2: only the core layers


def test_late_order_drops_the_deepest_flex_layers_first():
    assert drop_late_first([1, 2, 3, 4]) == [4, 3, 2, 1]
    schedule = DecaySchedule.build(10, alpha=0.5, min_layers=2, head=1, tail=1, skip_order="late")
    assert schedule.kept_layers(1) == (0, 1, 2, 3, 9)
    assert schedule.kept_layers(5) == (0, 9)


def test_fractions_of_the_layer_count():
    assert parse_layer_count("0.5", "x") == 0.5
    assert parse_layer_count("12", "x") == 12
    assert parse_layer_count("1.0", "x") == 1.0
    assert resolve_layer_count("0.7", 30, "x") == 21
    assert resolve_layer_count("1.0", 30, "x") == 30
    schedule = DecaySchedule.build(30, alpha=0.9, min_layers="0.5", head="0.1", tail="0.1")
    assert (schedule.min_layers, schedule.head, schedule.tail) == (15, 3, 3)


def test_a_custom_skip_order_is_a_plug_in():
    schedule = DecaySchedule.build(8, alpha=0.5, min_layers=2, head=1, tail=1,
                                   skip_order=lambda flex: list(flex), skip_order_name="ascending")
    assert schedule.skip_order == "ascending"
    assert schedule.drop_order == (1, 2, 3, 4, 5, 6)
    with pytest.raises(UserError, match="exactly once"):
        DecaySchedule.build(8, alpha=0.5, min_layers=2, head=1, tail=1, skip_order=lambda flex: [1, 1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=-0.5), "alpha"),
        (dict(alpha=1.01), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(warmup=-1), "warmup"),
        (dict(warmup=1.5), "warmup"),
        (dict(min_layers=40), "only 30 layers"),
        (dict(min_layers=3, head=2, tail=2), "must not exceed min-layers"),
        (dict(head=0, tail=0), "at least one core layer"),
        (dict(head=-1), "head must be >= 0"),
        (dict(min_layers="1.5"), r"\[0, 1\]"),
        (dict(min_layers="lots"), "whole number of layers or a fraction"),
        (dict(skip_order="random"), "unknown skip order"),
    ],
)
def test_invalid_parameters_are_rejected(kwargs, message):
    with pytest.raises(UserError, match=message):
        DecaySchedule.build(30, **{"min_layers": 10, "head": 2, "tail": 2, **kwargs})


def test_the_full_schedule_runs_every_layer_at_every_step():
    full = DecaySchedule.full(30)
    assert full.is_full_depth() and full.alpha == 1.0
    assert [full.layers_at(step) for step in (0, 1, 50, 5000)] == [30, 30, 30, 30]
    assert full.kept_layers(5000) == tuple(range(30))


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4])
def test_the_default_core_fits_a_shallow_model_and_a_users_core_is_still_checked(num_layers):
    schedule = DecaySchedule.build(num_layers, alpha=0.9)
    assert 1 <= schedule.head + schedule.tail <= schedule.min_layers <= num_layers
    assert all(schedule.layers_at(step) >= schedule.min_layers for step in range(8))
    with pytest.raises(UserError, match="must not exceed min-layers"):
        DecaySchedule.build(num_layers, alpha=0.9, head=num_layers, tail=1)
