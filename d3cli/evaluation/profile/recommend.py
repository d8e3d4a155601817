"""Calibration: the α and floor that reach a target speedup at the smallest NLL cost, given this model's step cost on
this machine (timing.py), checked by decoding.

A decode step that runs k layers costs about T_fixed + k·T_layer (T_fixed: embedding, final norm, LM head, sampling,
Python). For a reply of N tokens the decode speedup of a schedule is Σ T(L) / Σ T(k_i) over steps 1..N−1 (step 0 is
the prefill, the same for both). For each floor the largest α that reaches the target is a candidate; the candidate
whose teacher-forced NLL on the calibration texts rises least is recommended, then decoded on held-out texts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from d3cli.base.errors import UserError
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.evaluation import timing
from d3cli.evaluation.scoring import mean_nll_under, teacher_forced_nll
from d3cli.evaluation.timing import StepCosts


def predicted_speedup(schedule: DecaySchedule, reply_tokens: int, costs: StepCosts) -> float:
    """Σ T(L) / Σ T(k_i) over the decode steps 1..N−1 of an N-token reply."""
    steps = range(1, max(reply_tokens, 2))
    full = sum(costs.step_seconds(schedule.num_layers) for _ in steps)
    return full / sum(costs.step_seconds(schedule.layers_at(step)) for step in steps)


def layer_ratio(schedule: DecaySchedule, reply_tokens: int) -> float:
    """Mean layers per token over an N-token reply, as a fraction of L."""
    return sum(schedule.layers_at(i) for i in range(reply_tokens)) / (reply_tokens * schedule.num_layers)


@dataclass(frozen=True)
class Candidate:
    alpha: float
    min_layers: int
    predicted_speedup: float
    predicted_layer_ratio: float
    predicted_nll_increase: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def candidate_schedules(base: DecaySchedule, reaches: Callable[[DecaySchedule], bool],
                        max_candidates: int = 8) -> list[DecaySchedule]:
    """For each floor (at most `max_candidates`, spread from the core layers to L−1), the largest α, to 4 decimals,
    whose schedule `reaches` the target; floors that cannot reach it even at the tiniest α are left out."""
    schedule = base.retuned

    floors = list(range(base.head + base.tail, base.num_layers))
    if len(floors) > max_candidates:
        floors = sorted({floors[round(part * (len(floors) - 1) / (max_candidates - 1))]
                         for part in range(max_candidates)})
    found = []
    for floor in floors:
        if not reaches(schedule(1e-4, floor)):
            continue
        low, high = 1e-4, 1.0  # reaches(low) holds; find the largest alpha that still does
        for _ in range(40):
            middle = (low + high) / 2
            low, high = (middle, high) if reaches(schedule(middle, floor)) else (low, middle)
        alpha = max(1e-4, int(low * 1e4) / 1e4)
        found.append(schedule(alpha, floor))
    return found


def recommend(base: DecaySchedule, reply_tokens: int, costs: StepCosts, target_speedup: float | None,
              target_layer_ratio: float | None, nll_of: Callable[[Sequence[DecaySchedule]], list[float]]
              ) -> tuple[Candidate, list[Candidate]]:
    """The candidate that reaches the target with the smallest NLL increase, and every candidate considered.
    `nll_of(schedules)` gives each schedule's mean NLL; it is called once, with full depth first."""
    if (target_speedup is None) == (target_layer_ratio is None):
        raise UserError("give one of --target-speedup and --target-layer-ratio")
    if target_speedup is not None:
        if target_speedup <= 1.0:
            raise UserError(f"--target-speedup must be above 1, not {target_speedup:g}")

        def reaches(schedule: DecaySchedule) -> bool:
            return predicted_speedup(schedule, reply_tokens, costs) >= target_speedup
    else:
        if not 0.0 < target_layer_ratio < 1.0:
            raise UserError(f"--target-layer-ratio must lie in (0, 1), not {target_layer_ratio:g}")

        def reaches(schedule: DecaySchedule) -> bool:
            return layer_ratio(schedule, reply_tokens) <= target_layer_ratio

    schedules = candidate_schedules(base, reaches)
    if not schedules:
        best = predicted_speedup(base.retuned(1e-4, base.head + base.tail), reply_tokens, costs)
        raise UserError(f"no α and floor reach that target for a {reply_tokens}-token reply: even running only the "
                        f"{base.head + base.tail} core layers gives {best:.2f}x; lower the target or --head/--tail")
    full_nll, *nlls = nll_of([base.retuned(1.0, base.num_layers), *schedules])
    candidates = [Candidate(schedule.alpha, schedule.min_layers, predicted_speedup(schedule, reply_tokens, costs),
                            layer_ratio(schedule, reply_tokens), nll - full_nll)
                  for schedule, nll in zip(schedules, nlls)]
    chosen = min(candidates, key=lambda candidate: (candidate.predicted_nll_increase, -candidate.min_layers))
    return chosen, candidates


def recommend_and_check(model, texts, base_schedule: DecaySchedule, reply_tokens: int, target_speedup: float | None,
                        target_layer_ratio: float | None, on_stage: Callable[[str], None] = lambda stage: None) -> dict:
    """Measure step costs, pick α and the floor on half the texts, check by decoding the other half: profile-ppl's
    `recommendation`. `on_stage(description)` announces each stage."""
    shuffled = list(texts)
    random.Random(0).shuffle(shuffled)
    calibration_texts, check_texts = shuffled[0::2], shuffled[1::2]
    full = base_schedule.retuned(1.0, base_schedule.num_layers)
    on_stage("timing decode steps at several depths")
    costs = timing.measure_step_costs(model, check_texts[0].prompt_ids, base_schedule)
    on_stage("scoring candidate schedules")
    chosen, candidates = recommend(base_schedule, reply_tokens, costs, target_speedup, target_layer_ratio,
                                   lambda schedules: mean_nll_under(model, calibration_texts, schedules))
    recommended = base_schedule.retuned(chosen.alpha, chosen.min_layers)
    on_stage("checking the recommendation by decoding held-out texts")
    measured = timing.measured_decode_speedup(model, [text.prompt_ids for text in check_texts], recommended,
                                              reply_tokens)
    increase, tokens = 0.0, 0
    for text in check_texts:
        increase += float((teacher_forced_nll(model, text, recommended) - teacher_forced_nll(model, text, full)).sum())
        tokens += text.steps
    target = f"speedup {target_speedup:g}×" if target_speedup is not None else f"layer ratio {target_layer_ratio:g}"
    return {
        "target": target,
        "target_speedup": target_speedup,
        "target_layer_ratio": target_layer_ratio,
        "reply_tokens": reply_tokens,
        "step_costs": costs.as_dict(),
        "calibration_texts": len(calibration_texts),
        "recommended": chosen.as_dict(),
        "candidates": [candidate.as_dict() for candidate in candidates],
        "check": {"texts": len(check_texts), "measured_speedup": measured,
                  "measured_nll_increase": increase / max(tokens, 1),
                  "measured_layer_ratio": layer_ratio(recommended, reply_tokens)},
    }
