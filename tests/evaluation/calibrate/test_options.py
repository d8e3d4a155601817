"""What a calibration is asked for (evaluation/calibrate/options.py): every option checked where the options are
made, each mistake one sentence naming the option, and whether head and tail leave the model a layer to skip."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from d3cli.base.errors import UserError
from d3cli.evaluation.calibrate.options import CalibrationOptions, check_fits


@pytest.mark.parametrize("changes, message", [
    ({"prompts": 0}, "--prompts must be at least 1, not 0"),
    ({"prompts": 2.5}, "--prompts must be a whole number, not 2.5"),
    ({"reply_tokens": 17}, "--reply-tokens must be at least 18, not 17"),
    ({"batch_size": 0}, "--batch-size must be at least 1, not 0"),
    ({"profile_texts": 0}, "--profile-texts must be at least 1, not 0"),
    ({"rank": 0}, "--rank must be at least 1, not 0"),
    ({"schedule_prompts": 0}, "--schedule-prompts must be at least 1, not 0"),
    ({"schedule_tokens": 7}, "--schedule-tokens must be at least 8, not 7"),
    ({"ridge": 0.0}, "--ridge must be above 0, not 0.0"),
    ({"ridge": float("nan")}, "--ridge must be above 0, not nan"),
    ({"budget": -0.1}, "--budget must be above 0 nats per token, not -0.1"),
])
def test_a_bad_option_is_one_sentence_naming_it(changes, message):
    with pytest.raises(UserError) as raised:
        CalibrationOptions(**changes)
    assert str(raised.value) == message


def test_the_least_options_and_the_unset_ones_are_accepted():
    options = CalibrationOptions(prompts=None, reply_tokens=18, batch_size=1, profile_texts=1, rank=None,
                                 schedule_prompts=1, schedule_tokens=8, ridge=1e-9, budget=1e-9)
    assert (options.prompts, options.rank, options.reply_tokens) == (None, None, 18)


def test_head_and_tail_must_leave_a_layer_to_skip(tiny_models):
    loaded = SimpleNamespace(model=tiny_models["llama"])  # 8 layers
    assert check_fits(loaded, CalibrationOptions(head=3, tail=4)) == 8
    with pytest.raises(UserError) as raised:
        check_fits(loaded, CalibrationOptions(head=4, tail=4))
    assert str(raised.value) == "head + tail (4 + 4) leave no layer of 8 to skip"
