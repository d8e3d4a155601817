"""Teacher-forced scoring against the cached engine and against a plain forward of the whole sequence."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES

from d3cli.core.decode.schedule import DecaySchedule
from d3cli.evaluation.scoring import (
    ContinuationScorer,
    ScoringText,
    block_influence,
    mean_nll_under,
    plan_for_schedule,
    plan_skipping_one_layer,
    teacher_forced_nll,
)

TEXT = ScoringText("t", (1, 4093, 314, 260, 3575, 282, 4649, 47),
                   (504, 2988, 1694, 2030, 3681, 260, 2115, 23, 2564, 282, 614, 7297, 30, 9519, 28, 260, 3575,
                    282, 4649, 47))


def plain_nll(model, text: ScoringText) -> torch.Tensor:
    ids = torch.tensor([text.prompt_ids + text.continuation_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    log_probs = torch.log_softmax(logits[len(text.prompt_ids) - 1:-1], dim=-1)
    return -log_probs.gather(-1, torch.tensor(text.continuation_ids)[:, None])[:, 0]


def test_a_plan_skips_exactly_the_layers_a_step_does_not_keep():
    schedule = DecaySchedule.build(8, alpha=0.8, min_layers=3, head=1, tail=1)
    plan = plan_for_schedule(schedule, 12)
    for step in range(12):
        kept = set(schedule.kept_layers(step))
        assert {layer for layer in range(8) if not plan[layer, step]} == kept
    assert not plan[:, 0].any(), "the first token comes from the full-depth prefill"
    one = plan_skipping_one_layer(8, 5, 12, late_from=4)
    assert one.sum() == 8 and one[5, 4:].all() and not one[5, :4].any()


@pytest.mark.parametrize("family", FAMILIES)
def test_full_depth_scoring_equals_a_plain_forward(family, tiny_models):
    model = tiny_models[family]
    difference = (ContinuationScorer(model, TEXT).nll() - plain_nll(model, TEXT)).abs().max().item()
    assert difference < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_under_a_schedule_equals_cached_d3_decoding(family, tiny_models):
    """The one-forward scoring of a D3 schedule gives the NLL that decoding the same tokens with the cache gives."""
    model = tiny_models[family]
    scorer = ContinuationScorer(model, TEXT)
    for alpha, order in ((0.85, "middle"), (0.9, "late")):
        schedule = DecaySchedule.build(8, alpha=alpha, min_layers=3, head=1, tail=1, skip_order=order)
        assert len({schedule.layers_at(step) for step in range(TEXT.steps)}) > 2
        scored = scorer.nll(plan_for_schedule(schedule, TEXT.steps))  # the second plan reuses the prefix cache
        decoded = teacher_forced_nll(model, TEXT, schedule)
        assert (scored - decoded).abs().max().item() < 1e-4
        full = scorer.nll()
        assert (scored - full).abs().max().item() > 1e-3, "skipping must change something"
        assert scored[0].item() == pytest.approx(full[0].item(), abs=1e-5), "step 0 comes from the full prefill"


def test_scoring_on_the_embedded_model_equals_cached_d3_decoding(embedded):
    text = ScoringText("e", tuple(embedded.tokenizer("The capital of France is")["input_ids"]),
                       tuple(embedded.tokenizer(" Paris. It is known for the Eiffel Tower, museums and food, and "
                                                "millions visit it every year.", add_special_tokens=False)
                             ["input_ids"]))
    schedule = DecaySchedule.build(30, alpha=0.9)
    scored = ContinuationScorer(embedded.model, text).nll(plan_for_schedule(schedule, text.steps))
    decoded = teacher_forced_nll(embedded.model, text, schedule)
    assert (scored - decoded).abs().max().item() < 1e-3  # float32 noise of 30 layers, as in test_engine


def test_block_influence_is_one_minus_the_cosine_of_each_layers_input_and_output(tiny_models):
    model = tiny_models["llama"]
    scorer = ContinuationScorer(model, TEXT)
    sums, nll, top = block_influence(model, scorer, late_from=5)
    assert torch.allclose(nll, scorer.nll())
    assert torch.equal(top, scorer.score()[1])
    ids = torch.tensor([TEXT.prompt_ids + TEXT.continuation_ids[:-1]])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    start = len(TEXT.prompt_ids) - 1 + 5
    for layer in range(7):  # the last entry of hidden_states has the final norm applied
        cosine = torch.nn.functional.cosine_similarity(hidden[layer][0, start:], hidden[layer + 1][0, start:], dim=-1)
        assert sums[layer].item() == pytest.approx(float((1 - cosine).sum()), rel=1e-4)


def test_mean_nll_under_weights_every_token_once(tiny_models):
    model = tiny_models["qwen2"]
    short = ScoringText("s", TEXT.prompt_ids, TEXT.continuation_ids[:3])
    full = DecaySchedule.build(8, alpha=1.0)
    [mean] = mean_nll_under(model, [TEXT, short], [full])
    values = torch.cat([plain_nll(model, TEXT), plain_nll(model, short)])
    assert mean == pytest.approx(float(values.mean()), abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_forward_that_starts_at_a_later_layer_scores_the_same(family, tiny_models):
    """The layer profile runs each skip-alone plan from the skipped layer on, from full-depth inputs saved before."""
    model = tiny_models[family]
    scorer = ContinuationScorer(model, TEXT)
    inputs = {}
    block_influence(model, scorer, 4, inputs)
    for layer in (0, 3, 7):
        plan = plan_skipping_one_layer(8, layer, TEXT.steps, late_from=4)
        assert (scorer.nll_from(layer, inputs[layer], plan) - scorer.nll(plan)).abs().max().item() < 1e-5
    assert (scorer.nll() - plain_nll(model, TEXT)).abs().max().item() < 1e-4, "the model is whole again"
