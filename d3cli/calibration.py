"""Calibration: this model's step cost on this machine, and the α and floor that reach a target speedup at the
smallest NLL cost, checked by decoding.

A decode step that runs k layers costs about T_fixed + k·T_layer (T_fixed: embedding, final norm, LM head, sampling,
Python). For a reply of N tokens the decode speedup of a schedule is Σ T(L) / Σ T(k_i) over steps 1..N−1 (step 0 is
the prefill, the same for both). For each floor the largest α that reaches the target is a candidate; the candidate
whose teacher-forced NLL on the calibration texts rises least is recommended, then decoded on held-out texts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from d3cli.engine import generate_steps, make_prompt_batch, model_device, synchronize
from d3cli.errors import UserError
from d3cli.schedule import DecaySchedule, StaticSchedule


@dataclass(frozen=True)
class StepCosts:
    """The fitted per-step cost T(k) = t_fixed_s + k·t_layer_s, from the median step time at each depth."""

    num_layers: int
    t_fixed_s: float
    t_layer_s: float
    r2: float
    samples: tuple[tuple[int, float], ...]  # (layers kept, median seconds per step)

    def step_seconds(self, layers: int) -> float:
        return self.t_fixed_s + layers * self.t_layer_s

    def as_dict(self) -> dict:
        return {"t_fixed_ms": self.t_fixed_s * 1e3, "t_layer_ms": self.t_layer_s * 1e3, "r2": self.r2,
                "step_ms": [{"layers": layers, "ms": seconds * 1e3} for layers, seconds in self.samples]}


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """Least squares y = intercept + slope·x; returns (intercept, slope, r2)."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx if sxx else 0.0
    intercept = mean_y - slope * mean_x
    sst = sum((y - mean_y) ** 2 for y in ys)
    sse = sum((y - intercept - slope * x) ** 2 for x, y in points)
    return intercept, slope, (1.0 - sse / sst) if sst > 0 else 1.0


def decode_seconds(model, prompt_ids: Sequence[int], schedule: DecaySchedule, tokens: int) -> list[float]:
    """Wall seconds of each decode step (steps 1..tokens−1) of greedy decoding with `schedule`."""
    batch = make_prompt_batch([list(prompt_ids)], pad_token_id=0, device=model_device(model))
    durations, last = [], None
    for step in generate_steps(model, batch, schedule, max_new_tokens=tokens):
        synchronize(model)
        now = time.perf_counter()
        if step.index > 0:
            durations.append(now - last)
        last = now
    return durations


def measure_step_costs(model, prompt_ids: Sequence[int], base: DecaySchedule, depths: Sequence[int] | None = None,
                       tokens: int = 24, repeats: int = 3) -> StepCosts:
    """Median step time at several fixed depths (a warm-up run excluded), and the straight line through them.
    The depths take turns within each repeat, so a drift in machine speed bends no part of the line alone."""
    num_layers = base.num_layers
    if depths is None:
        floor = base.head + base.tail
        depths = sorted({num_layers, floor, *(floor + (num_layers - floor) * part // 4 for part in (1, 2, 3))})
    decode_seconds(model, prompt_ids, StaticSchedule.like(base, num_layers), min(tokens, 8))  # warm-up
    schedules = [StaticSchedule.like(base, depth) for depth in depths]
    step_seconds: list[list[float]] = [[] for _ in schedules]
    for _ in range(repeats):
        for seconds, schedule in zip(step_seconds, schedules):
            seconds.extend(decode_seconds(model, prompt_ids, schedule, tokens))
    samples = [(schedule.depth, statistics.median(seconds)) for schedule, seconds in zip(schedules, step_seconds)]
    t_fixed, t_layer, r2 = fit_line(samples)
    return StepCosts(num_layers, max(t_fixed, 0.0), max(t_layer, 1e-9), r2, tuple(samples))


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


def measured_decode_speedup(model, prompts: Sequence[Sequence[int]], schedule: DecaySchedule,
                            reply_tokens: int, repeats: int = 1) -> float:
    """Decode time at full depth over decode time with `schedule`: each step's median over `repeats` rounds, summed
    over the steps and prompts (a median per step drops a stall that hit one round). The two alternate per prompt,
    each going first in every other round, so drifts in machine speed hit both alike."""
    full = StaticSchedule.like(schedule, schedule.num_layers)
    decode_seconds(model, prompts[0], full, min(reply_tokens, 8))  # warm-up
    rounds: dict[str, list[list[float]]] = {"full": [], "d3": []}
    for round_index in range(repeats):
        sides = [("full", full), ("d3", schedule)]
        if round_index % 2:
            sides.reverse()
        steps: dict[str, list[float]] = {"full": [], "d3": []}
        for prompt in prompts:
            for name, chosen in sides:
                steps[name] += decode_seconds(model, prompt, chosen, reply_tokens)
        for name in rounds:
            rounds[name].append(steps[name])
    d3_total = median_total(rounds["d3"])
    return median_total(rounds["full"]) / d3_total if d3_total > 0 else float("nan")


def median_total(rounds: Sequence[Sequence[float]]) -> float:
    """The sum over positions of each position's median across rounds (each round times the same steps): a stall
    that hit one round moves no total, as it would a total per round."""
    return sum(map(statistics.median, zip(*rounds, strict=True)))
