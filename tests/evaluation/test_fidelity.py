"""Free-running fidelity (evaluation/fidelity.py): repetition, first difference, answer checks, and replies compared
on a real (tiny) model: a schedule that keeps full depth is identical to it, one that skips is not."""

from __future__ import annotations

import pytest

from d3cli.core.model.loader import LoadedModel
from d3cli.core.session.plan import plan_of
from d3cli.core.session.settings import DecodeSettings
from d3cli.evaluation.builtin_prompts import builtin_reply_prompts
from d3cli.evaluation.fidelity import compare_with, first_difference, full_depth_replies, repeated_share, summary


def test_repeated_share_is_zero_for_fresh_text_and_near_one_for_a_loop():
    assert repeated_share(list(range(40))) == 0.0
    loop = [5, 6, 7] * 30
    assert repeated_share(loop) > 0.9
    assert repeated_share([1, 2, 3]) == 0.0  # too short for one 4-gram
    half = list(range(20)) + list(range(20))  # the second half repeats the first
    assert repeated_share(half) == pytest.approx(17 / 37)


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2  # one is a prefix of the other


@pytest.fixture
def loaded(tiny_models, tokenizer):
    return LoadedModel(tiny_models["llama"], tokenizer, "tiny")


def compared(loaded, count: int, min_layers: int, tokens: int, full_batch: int, batch: int):
    """The first `count` built-in prompts: their full-depth replies (decoded `full_batch` at a time) and the replies
    under α 0.5 with this floor (`batch` at a time), compared."""
    prompts = builtin_reply_prompts()[:count]
    full = full_depth_replies(loaded, prompts, plan_of(DecodeSettings(head=1, tail=1, max_new_tokens=tokens)
                                                        .full_depth(), 8), batch_size=full_batch)
    plan = plan_of(DecodeSettings(alpha=0.5, min_layers=min_layers, head=1, tail=1, max_new_tokens=tokens), 8)
    return full, compare_with(loaded, full, plan, batch_size=batch)


def test_full_depth_compared_with_itself_is_identical(loaded):
    _, pairs = compared(loaded, 3, min_layers=8, tokens=16, full_batch=2, batch=3)  # a floor of L skips nothing
    found = summary(pairs)
    assert found["identical"] == 3 and found["delta_nll"] == 0.0 and found["worst_delta_repetition"] == 0.0
    assert found["loops"] == 0 and found["median_first_difference"] is None
    assert all(pair.nll_full is not None and pair.nll_full > 0 for pair in pairs)


def test_a_skipping_schedule_is_measured_against_full_depth(loaded):
    full, pairs = compared(loaded, 4, min_layers=2, tokens=20, full_batch=4, batch=4)
    found = summary(pairs)
    assert found["identical"] < 4 and found["mean_layers"] < 8
    assert found["delta_nll"] > 0  # the full model finds the skipped model's words less likely than its own
    for pair in pairs:
        assert pair.first_difference is not None and 0 <= pair.first_difference <= min(pair.tokens, pair.full_tokens)
        assert pair.as_dict()["delta_nll"] == pytest.approx(pair.nll - pair.nll_full)
    # the one-pass NLL equals the cached engine forced through the same tokens, one step at a time
    from d3cli.core.decode.schedule import DecaySchedule
    from d3cli.evaluation.scoring import ScoringText, teacher_forced_nll

    stepwise = teacher_forced_nll(loaded.model, ScoringText("r", tuple(full.prompt_ids[0]), tuple(full.tokens[0])),
                                  DecaySchedule.full(8))
    assert full.nll[0] == pytest.approx(float(stepwise.mean()), abs=1e-4)
