"""The schedule a calibration chooses (evaluation/calibrate/schedule_choice.py): a model with depth to spare gets a lower floor
than one without; the budget is checked; speed is predicted from step costs."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from d3cli.base.errors import UserError
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.core.model.loader import LoadedModel
from d3cli.core.session.settings import DecodeSettings
from d3cli.evaluation.builtin_prompts import builtin_reply_prompts
from d3cli.evaluation.calibrate.schedule_choice import Budget, choose_schedule, predicted_speedup

SETTINGS = DecodeSettings(head=1, tail=1, skip_order="middle")


def near_identity(model, layers):
    """The model with these decoder layers made to add almost nothing to the residual stream."""
    with torch.no_grad():
        for index in layers:
            layer = model.model.layers[index]
            layer.self_attn.o_proj.weight.mul_(1e-4)
            layer.mlp.down_proj.weight.mul_(1e-4)
    return model


@pytest.fixture(scope="module")
def choices(tokenizer):
    prompts = builtin_reply_prompts()[:3]
    plain = LoadedModel(build_tiny_model("llama", len(tokenizer), seed=3), tokenizer, "plain")
    redundant = LoadedModel(near_identity(build_tiny_model("llama", len(tokenizer), seed=3), range(1, 7)),
                            tokenizer, "redundant")
    return {name: choose_schedule(loaded, SETTINGS, prompts, Budget(), reply_tokens=16, batch_size=3)
            for name, loaded in (("plain", plain), ("redundant", redundant))}


def test_a_model_with_redundant_depth_gets_a_lower_floor(choices):
    plain, redundant = choices["plain"], choices["redundant"]
    assert redundant.min_layers < plain.min_layers, (redundant.as_dict(), plain.as_dict())
    assert redundant.min_layers <= 3 and redundant.predicted_speedup > 1.05  # (nearly) every flex layer may go
    assert redundant.fidelity["loops"] == 0 and redundant.fidelity["delta_nll"] <= Budget().nll


def test_the_choice_is_the_fastest_candidate_within_the_budget(choices):
    for choice in choices.values():
        admitted = [candidate for candidate in choice.candidates if candidate.within_budget]
        for candidate in choice.candidates:
            found = candidate.fidelity
            assert candidate.within_budget == (found["worst_delta_repetition"] <= Budget().repetition
                                               and found["delta_nll"] <= Budget().nll)
        if admitted:
            assert choice.predicted_speedup == max(candidate.predicted_speedup for candidate in admitted)
        else:
            assert (choice.alpha, choice.min_layers, choice.fidelity) == (1.0, 8, None)
        stored = choice.as_dict()
        assert stored["budget"] == {"nll": 0.10, "repetition": 0.05} and len(stored["candidates"]) == len(
            choice.candidates)


def test_the_search_stops_after_two_floors_with_no_schedule_within_budget(choices):
    plain = choices["plain"]  # every layer of a random model matters: nothing passes at the first two floors
    assert [(candidate.min_layers, candidate.within_budget) for candidate in plain.candidates] == [
        (7, False)] * 3 + [(6, False)] * 3
    assert (plain.alpha, plain.min_layers, plain.fidelity) == (1.0, 8, None)


def test_candidates_with_the_same_depth_at_every_step_are_decoded_once(tokenizer, monkeypatch):
    from d3cli.evaluation.calibrate import schedule_choice

    decoded = []
    compare = schedule_choice.compare_with
    monkeypatch.setattr(schedule_choice, "compare_with",
                        lambda loaded, full, plan, *args, **kwargs: decoded.append(plan.schedule) or
                        compare(loaded, full, plan, *args, **kwargs))
    plain = LoadedModel(build_tiny_model("llama", len(tokenizer), seed=3), tokenizer, "plain")
    choice = choose_schedule(plain, SETTINGS, builtin_reply_prompts()[:2], Budget(), reply_tokens=16, batch_size=2)
    # the noise reference (full depth alone), floor 7 once (every α reaches it at token 1), floor 6 three times
    assert [(schedule.alpha, schedule.min_layers) for schedule in decoded] == [
        (1.0, 8), (0.99, 7), (0.99, 6), (0.98, 6), (0.95, 6)]
    at_seven = [candidate for candidate in choice.candidates if candidate.min_layers == 7]
    assert len(at_seven) == 3 and len({str(candidate.fidelity) for candidate in at_seven}) == 1


def test_predicted_speedup_follows_the_step_costs():
    schedule = DecaySchedule.build(10, alpha=0.5, min_layers=4, head=1, tail=1)
    free_fixed = predicted_speedup(schedule, [50], {"t_fixed_ms": 0.0, "t_layer_ms": 1.0})
    assert free_fixed == pytest.approx(10 / 4, rel=0.05)  # nearly every step runs the floor
    heavy_fixed = predicted_speedup(schedule, [50], {"t_fixed_ms": 10.0, "t_layer_ms": 1.0})
    assert 1.0 < heavy_fixed < free_fixed
    assert predicted_speedup(DecaySchedule.full(10), [50], {"t_fixed_ms": 1.0, "t_layer_ms": 1.0}) == 1.0


def test_a_budget_must_be_positive():
    with pytest.raises(UserError, match="--budget must be above 0"):
        Budget(nll=0)
