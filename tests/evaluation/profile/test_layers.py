"""profile-ppl's measurements (evaluation/profile/layers.py): the per-position NLL at full depth and under schedules,
each layer skipped alone at late positions, the layer profile made of them, the report and the layer rows."""

from __future__ import annotations

import pytest
import torch

from d3cli.base.errors import UserError
from d3cli.core.calibration.layer_profile import LayerProfile, LayerScore
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.evaluation.profile.layers import Measurements, layer_profile_of, layer_rows, measure, report
from d3cli.evaluation.scoring import ContinuationScorer, ScoringText, plan_skipping_one_layer, teacher_forced_nll

TEXTS = [ScoringText("a", (1, 4093, 314, 260), tuple(range(500, 512))), ScoringText("b", (1, 33), (600, 601, 602,
                                                                                                  603, 604, 605))]
DECAYED = DecaySchedule.build(8, alpha=0.7, min_layers=3, head=1, tail=1)


def plain_forward_nll(model, text: ScoringText) -> list[float]:
    ids = torch.tensor([[*text.prompt_ids, *text.continuation_ids[:-1]]])
    with torch.inference_mode():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)[len(text.prompt_ids) - 1:]
    return (-log_probs.gather(-1, torch.tensor(text.continuation_ids)[:, None])[:, 0]).tolist()


def test_measure_scores_full_depth_each_schedule_and_each_layer_skipped_alone(tiny_models):
    model = tiny_models["llama"]
    schedules = {"full": DecaySchedule.build(8, alpha=1.0), "α=0.7": DECAYED}
    seen = []
    found = measure(model, TEXTS, schedules, 8, layer_profile=True, late_from=4, on_text=lambda: seen.append(1))
    assert len(seen) == 2 and found.late_tokens == (12 - 4) + (6 - 4)
    for text, full in zip(TEXTS, found.full_nll):
        assert full == pytest.approx(plain_forward_nll(model, text), abs=1e-4)
    assert found.schedule_nll["full"] == found.full_nll and found.schedule_agreement["full"] == [18, 18]
    for text, decayed in zip(TEXTS, found.schedule_nll["α=0.7"]):
        assert decayed == pytest.approx(teacher_forced_nll(model, text, DECAYED).tolist(), abs=1e-3)
    same, total = found.schedule_agreement["α=0.7"]
    assert total == 18 and 0 <= same <= 18
    for layer in range(8):  # each from a fresh scorer over every layer, not from the layer's saved input
        expected = 0.0
        for text, full in zip(TEXTS, found.full_nll):
            skipped = ContinuationScorer(model, text).nll(plan_skipping_one_layer(8, layer, text.steps, 4))
            expected += float((skipped[4:] - torch.tensor(full[4:])).double().sum())
        assert float(found.skip_increase_sums[layer]) == pytest.approx(expected, abs=1e-3)
    assert found.influence_sums.shape == (8,) and bool((found.influence_sums >= 0).all())
    profile = layer_profile_of(found, {"name": "tiny"}, "two texts", 2, 4)
    assert (profile.corpus, profile.texts, profile.late_from, profile.num_layers) == ("two texts", 2, 4, 8)
    assert [score.nll_increase for score in profile.layers] == pytest.approx(
        (found.skip_increase_sums / 10).tolist())
    assert [score.block_influence for score in profile.layers] == pytest.approx((found.influence_sums / 10).tolist())


def test_a_layer_profile_needs_a_continuation_past_late_from(tiny_models):
    with pytest.raises(UserError) as raised:
        measure(tiny_models["llama"], TEXTS, {}, 8, layer_profile=True, late_from=12)  # the longest has 12 steps
    assert str(raised.value) == ("no continuation is longer than --late-from 12 tokens: lower --late-from or use "
                                 "longer continuations")


def test_the_report_holds_each_schedules_cost_against_full_depth():
    found = Measurements(full_nll=[[3.0, 2.0, 1.0, 1.0], [2.0, 2.0]],
                         schedule_nll={"α=0.7": [[3.5, 2.5, 1.0, 2.0], [2.0, 3.0]]},
                         schedule_agreement={"α=0.7": [4, 6]})
    made = report(found, {"α=0.7": DECAYED}, bucket_size=2, max_positions=4)
    assert (made["texts"], made["tokens"], made["bucket_size"], made["max_positions"]) == (2, 6, 2, 4)
    assert made["mean_nll"] == pytest.approx(11 / 6)
    assert [(row["first"], row["last"], row["count"]) for row in made["buckets"]] == [(0, 1, 4), (2, 3, 2)]
    (decayed,) = made["d3"]
    assert (decayed["label"], decayed["alpha"], decayed["min_layers"], decayed["bridges"]) == ("α=0.7", 0.7, 3, False)
    assert decayed["mean_nll"] == pytest.approx(14 / 6) and decayed["nll_increase"] == pytest.approx(0.5)
    assert decayed["top1_agreement"] == pytest.approx(4 / 6)
    depths = [DECAYED.layers_at(position) for position in (0, 1, 2, 3, 0, 1)]
    assert decayed["mean_layers"] == pytest.approx(sum(depths) / 6)
    assert [(b["first"], b["last"]) for b in decayed["buckets"]] == [(0, 1), (2, 3)]
    assert [b["mean_nll"] for b in decayed["buckets"]] == pytest.approx([2.75, 1.5])
    assert [b["nll_increase"] for b in decayed["buckets"]] == pytest.approx([0.5, 0.5])


def test_layer_rows_mark_the_core_layers_and_rank_by_importance():
    scores = [LayerScore(0, 0.5, 3.0), LayerScore(1, 0.1, 0.2), LayerScore(2, 0.2, 0.1), LayerScore(3, 0.4, 0.05)]
    profile = LayerProfile(model={}, corpus="c", texts=1, late_from=16, layers=tuple(scores))
    rows = layer_rows(profile, head=1, tail=1)
    assert [(row["layer"], row["core"], row["importance_rank"]) for row in rows] == [
        (0, True, 3), (1, False, 2), (2, False, 1), (3, True, 0)]  # least important first: by the NLL increase
    assert (rows[2]["block_influence"], rows[2]["nll_increase"]) == (0.2, 0.1)
