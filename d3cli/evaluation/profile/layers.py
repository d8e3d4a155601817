"""profile-ppl's measurements over a corpus: the per-position NLL at full depth and under D3 schedules, and the
layer profile (block influence and the NLL cost of skipping each layer alone at late positions).

Every text is prefilled once and then scored under each plan it needs (scoring.py), so the cost is one forward of
the continuation per plan: 1 + (number of schedules) + (L, with the layer profile) per text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from d3cli.base.errors import UserError
from d3cli.core.calibration.layer_profile import LayerProfile, LayerScore
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.evaluation.profile.perplexity import buckets, fit_profile
from d3cli.evaluation.scoring import (
    ContinuationScorer,
    ScoringText,
    block_influence,
    plan_skipping_one_layer,
)


@dataclass
class Measurements:
    full_nll: list[list[float]] = field(default_factory=list)  # per text, per position
    schedule_nll: dict[str, list[list[float]]] = field(default_factory=dict)  # label -> per text, per position
    schedule_agreement: dict[str, list[int]] = field(default_factory=dict)  # label -> [same top token, tokens]
    influence_sums: torch.Tensor | None = None  # [layers] Σ over late tokens of 1 - cos
    skip_increase_sums: torch.Tensor | None = None  # [layers] Σ over late tokens of the NLL increase
    late_tokens: int = 0


def measure(model, texts: Sequence[ScoringText], schedules: dict[str, DecaySchedule], num_layers: int,
            layer_profile: bool = False, late_from: int = 16,
            on_text: Callable[[], None] | None = None) -> Measurements:
    """Score every text at full depth, under each schedule, and (with `layer_profile`) with each layer skipped."""
    found = Measurements(schedule_nll={label: [] for label in schedules},
                         schedule_agreement={label: [0, 0] for label in schedules})
    if layer_profile:
        if not any(text.steps > late_from for text in texts):
            raise UserError(f"no continuation is longer than --late-from {late_from} tokens: lower --late-from or "
                            "use longer continuations")
        found.influence_sums = torch.zeros(num_layers, dtype=torch.float64)
        found.skip_increase_sums = torch.zeros(num_layers, dtype=torch.float64)
    for text in texts:
        scorer = ContinuationScorer(model, text)
        late = layer_profile and text.steps > late_from
        inputs: dict[int, torch.Tensor] = {}  # every layer's full-depth input: a skip-alone forward starts there
        if late:
            influence, full, full_top = block_influence(model, scorer, late_from, inputs)
            found.influence_sums += influence
        else:
            full, full_top = scorer.score()
        found.full_nll.append(full.tolist())
        for label, schedule in schedules.items():
            nll, top = (full, full_top) if schedule.is_full_depth() else scorer.score_schedule(schedule)
            found.schedule_nll[label].append(nll.tolist())
            found.schedule_agreement[label][0] += int((top == full_top).sum())
            found.schedule_agreement[label][1] += text.steps
        if late:
            for layer in range(num_layers):
                skipped = scorer.nll_from(layer, inputs[layer],
                                          plan_skipping_one_layer(num_layers, layer, text.steps, late_from))
                found.skip_increase_sums[layer] += float((skipped[late_from:] - full[late_from:]).double().sum())
            found.late_tokens += text.steps - late_from
        if on_text is not None:
            on_text()
    return found


def layer_profile_of(found: Measurements, identity: dict, corpus: str, texts: int, late_from: int) -> LayerProfile:
    influence = found.influence_sums / found.late_tokens
    increase = found.skip_increase_sums / found.late_tokens
    return LayerProfile(model=identity, corpus=corpus, texts=texts, late_from=late_from,
                        layers=tuple(LayerScore(layer, float(influence[layer]), float(increase[layer]))
                                     for layer in range(len(influence))))


def _mean_all(per_text: Sequence[Sequence[float]]) -> float:
    count = sum(len(values) for values in per_text)
    return sum(sum(values) for values in per_text) / count if count else float("nan")


def report(found: Measurements, schedules: dict[str, DecaySchedule], bucket_size: int, max_positions: int) -> dict:
    """The per-position profile as JSON-ready data: buckets with intervals and the fit, and each schedule's cost."""
    fit = fit_profile(found.full_nll, max_positions)
    full_buckets = buckets(found.full_nll, bucket_size, max_positions)
    rows = []
    for bucket in full_buckets:
        row = bucket.as_dict()
        row["fit"] = (sum(fit.predict(position) for position in range(bucket.first, bucket.last + 1))
                      / (bucket.last - bucket.first + 1)) if fit else None
        rows.append(row)
    full_mean = _mean_all(found.full_nll)
    decayed = []
    for label, schedule in schedules.items():
        per_text = found.schedule_nll[label]
        schedule_buckets = buckets(per_text, bucket_size, max_positions)
        layers = [schedule.layers_at(position) for values in per_text for position in range(len(values))]
        mean_nll = _mean_all(per_text)
        same, total = found.schedule_agreement[label]
        decayed.append({
            "label": label,
            "alpha": schedule.alpha,
            "min_layers": schedule.min_layers,
            "skip_order": schedule.skip_order,
            "bridges": schedule.bridge_maps is not None,
            "mean_layers": sum(layers) / len(layers) if layers else float("nan"),
            "mean_nll": mean_nll,
            "nll_increase": mean_nll - full_mean,
            "top1_agreement": same / total if total else float("nan"),
            "buckets": [{"first": b.first, "last": b.last, "mean_nll": b.mean_nll,
                         "nll_increase": b.mean_nll - full.mean_nll}
                        for b, full in zip(schedule_buckets, full_buckets)],
        })
    return {
        "texts": len(found.full_nll),
        "tokens": sum(len(values) for values in found.full_nll),
        "bucket_size": bucket_size,
        "max_positions": max_positions,
        "mean_nll": full_mean,
        "buckets": rows,
        "fit": fit.as_dict() if fit else None,
        "d3": decayed,
    }


def layer_rows(profile: LayerProfile, head: int, tail: int) -> list[dict]:
    ranking = profile.importance_ranking()
    return [{"layer": score.layer, "block_influence": score.block_influence, "nll_increase": score.nll_increase,
             "core": score.layer < head or score.layer >= profile.num_layers - tail,
             "importance_rank": ranking.index(score.layer)}
            for score in profile.layers]
