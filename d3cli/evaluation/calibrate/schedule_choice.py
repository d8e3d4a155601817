"""The schedule a model's calibration chooses: the fastest (α, min-layers) whose free-running replies stay within a
fidelity budget.

`d3 calibrate`'s last stage. For candidate pairs, from the safest (a floor one below L) down, the model answers
prompts held out from the bridges' fit, greedily, under that schedule (with the calibration's order and bridges);
each reply is compared with the full-depth reply to the same prompt (fidelity.py). A candidate is within the budget
when no reply repeats itself more than full depth's by more than `budget.repetition` of its 4-grams (none loops) and
the full-depth model's NLL of the replies is at most `budget.nll` nats/token above that of its own replies, on
average. Each candidate's speed is predicted from the model's measured step costs, T(k) = T_fixed + k·T_layer (+ a
bridge's T_bridge per bridged run), over the steps of its own replies; the fastest candidate within the budget is
the model's schedule. When none is, the model keeps full depth (α 1), and the calibration says so. Beside the candidates, full depth is
compared with itself, its replies decoded one at a time instead of in a batch: a small model's greedy replies can
change on rounding alone, and that is the floor under any schedule's numbers.

A lower floor is rarely safer than a higher one, so the search stops after two floors where no α was within the
budget. Every candidate, measured, goes into the calibration file, so what the choice rests on can be read there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from d3cli.base.errors import UserError
from d3cli.core.model.model_facts import num_decoder_layers
from d3cli.core.session.plan import plan_for
from d3cli.evaluation.builtin_prompts import ReplyPrompt
from d3cli.evaluation.calibrate.defaults import DEFAULT_NLL_BUDGET, SCHEDULE_TOKENS
from d3cli.evaluation.fidelity import LOOP_MARGIN, compare_with, full_depth_replies, summary
from d3cli.evaluation.speed.steps import bridged_runs_at, step_times

CANDIDATE_ALPHAS = (0.99, 0.98, 0.95)  # slowest decay first: the first tokens set where a reply goes
FAILED_FLOORS_TO_STOP = 2


@dataclass(frozen=True)
class Budget:
    """How far a calibrated schedule's replies may stray from full depth's."""

    nll: float = DEFAULT_NLL_BUDGET  # mean change in the full-depth model's NLL per token of the replies
    repetition: float = LOOP_MARGIN  # the largest change in a reply's share of repeated 4-grams

    def __post_init__(self) -> None:
        if not self.nll > 0:
            raise UserError(f"--budget must be above 0 nats per token, not {self.nll}")

    def admits(self, found: dict) -> bool:
        return (found["worst_delta_repetition"] is not None and found["worst_delta_repetition"] <= self.repetition
                and found["delta_nll"] is not None and found["delta_nll"] <= self.nll)


@dataclass
class Candidate:
    alpha: float
    min_layers: int
    fidelity: dict  # fidelity.summary of its replies
    predicted_speedup: float
    within_budget: bool

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ScheduleChoice:
    """The chosen α and min-layers (α 1 and L: no candidate was within the budget), and what it rests on."""

    alpha: float
    min_layers: int
    budget: Budget
    predicted_speedup: float
    fidelity: dict | None  # the chosen candidate's, None for full depth
    step_costs: dict  # t_fixed_ms, t_layer_ms (, t_bridge_ms)
    prompts: int
    reply_tokens: int
    candidates: list[Candidate] = field(default_factory=list)
    # full depth against itself: its replies decoded one at a time instead of batched (other rounding), fidelity.summary
    # of those pairs. How far a model's replies move on rounding alone: the floor under any schedule's numbers.
    noise: dict | None = None

    def as_dict(self) -> dict:
        """As the calibration file stores it (model_calibration: "schedule")."""
        return {"alpha": self.alpha, "min_layers": self.min_layers,
                "budget": {"nll": self.budget.nll, "repetition": self.budget.repetition},
                "predicted_speedup": self.predicted_speedup, "fidelity": self.fidelity,
                "step_costs": self.step_costs, "prompts": self.prompts, "reply_tokens": self.reply_tokens,
                "candidates": [candidate.as_dict() for candidate in self.candidates], "noise": self.noise}


Progress = Callable[[str, int], None]


def predicted_speedup(schedule, lengths: Sequence[int], costs: dict) -> float:
    """T(L) over the mean predicted step time of replies of these lengths decoded with `schedule` (decode steps
    1..n−1: step 0 is the prefill's)."""
    fixed, layer = costs["t_fixed_ms"], costs["t_layer_ms"]
    bridge = costs.get("t_bridge_ms", 0.0)
    steps = [step for length in lengths for step in range(1, max(length, 2))]
    if not steps:
        return 1.0
    full = fixed + schedule.num_layers * layer
    mean = sum(fixed + schedule.layers_at(step) * layer + bridged_runs_at(schedule, step) * bridge
               for step in steps) / len(steps)
    return full / mean if mean > 0 else 1.0


def measure_step_costs(loaded, plan, prompt_ids: Sequence[int]) -> dict:
    """The model's step costs (speed.step_times, short): T_fixed, T_layer, and T_bridge with bridges."""
    found = step_times(loaded.model, prompt_ids, plan.schedule, tokens=16, repeats=2)
    costs = {key: found[key] for key in ("t_fixed_ms", "t_layer_ms", "t_bridge_ms", "r2") if key in found}
    costs["num_layers"] = plan.schedule.num_layers
    return costs


def choose_schedule(loaded, settings, prompts: Sequence[ReplyPrompt], budget: Budget,
                    reply_tokens: int = SCHEDULE_TOKENS, batch_size: int = 12,
                    progress: Progress = lambda stage, amount: None) -> ScheduleChoice:
    """The fastest candidate schedule within `budget` for `loaded` (with its calibration activated: its skip order
    and bridges), its replies to `prompts` compared with full depth's. `settings`: the reply settings besides α and
    min-layers (head, tail, skip order, bridges)."""
    if not prompts:
        raise UserError("choosing a schedule needs held-out prompts: use fewer --prompts for the bridges")
    num_layers = num_decoder_layers(loaded.model)
    settings = dataclasses.replace(settings, max_new_tokens=reply_tokens)
    full_plan = plan_for(loaded, settings.full_depth())
    full = full_depth_replies(loaded, prompts, full_plan, batch_size, on_reply=lambda: progress("schedule", 1))
    noise = summary(compare_with(loaded, full, full_plan, 1, on_reply=lambda: progress("schedule", 1)))
    base = plan_for(loaded, dataclasses.replace(settings, alpha=CANDIDATE_ALPHAS[0], min_layers=num_layers - 1))
    costs = measure_step_costs(loaded, base, full.prompt_ids[0])
    head_tail = base.schedule.head + base.schedule.tail
    candidates, failed_in_a_row = [], 0
    measured: dict[tuple[int, ...], Candidate] = {}  # depth per step -> its measurement
    for floor in range(num_layers - 1, max(head_tail, 1) - 1, -1):
        passed = False
        for alpha in CANDIDATE_ALPHAS:
            plan = plan_for(loaded, dataclasses.replace(settings, alpha=alpha, min_layers=floor))
            # pairs that decode every step at the same depth are one schedule (at floor L−1 every α < 1 is): the
            # same order and bridges make the same replies, so it is measured once
            depths = tuple(plan.schedule.layers_at(step) for step in range(reply_tokens))
            if depths not in measured:
                pairs = compare_with(loaded, full, plan, batch_size, on_reply=lambda: progress("schedule", 1))
                found = summary(pairs)
                speed = predicted_speedup(plan.schedule, [pair.tokens + 1 for pair in pairs], costs)
                measured[depths] = Candidate(alpha, floor, found, round(speed, 4), budget.admits(found))
            same = measured[depths]
            candidates.append(Candidate(alpha, floor, same.fidelity, same.predicted_speedup, same.within_budget))
            passed = passed or same.within_budget
        failed_in_a_row = 0 if passed else failed_in_a_row + 1
        if failed_in_a_row >= FAILED_FLOORS_TO_STOP:
            break
    admitted = [candidate for candidate in candidates if candidate.within_budget]
    if not admitted:
        return ScheduleChoice(1.0, num_layers, budget, 1.0, None, costs, len(prompts), reply_tokens, candidates,
                              noise)
    best = max(admitted, key=lambda candidate: (candidate.predicted_speedup, candidate.min_layers))
    return ScheduleChoice(best.alpha, best.min_layers, budget, best.predicted_speedup, best.fidelity, costs,
                          len(prompts), reply_tokens, candidates, noise)


def expected_replies(prompts: int, floors: int) -> int:
    """An upper bound on the replies the stage decodes, for a progress bar: full depth's and each candidate's."""
    return prompts * (2 + floors * len(CANDIDATE_ALPHAS))
