"""Timing decode steps on this machine: each step's wall time, the line T(k) = T_fixed + k·T_layer through the
median step time at several depths, and the decode speedup of a schedule measured against full depth.

Each measurement lets the compared sides take turns (depths within a round; full depth and the schedule per
prompt, each going first in every other round) and takes medians per step over rounds, so a drift in this machine's
speed or a stall in one round moves no result alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from d3cli.core.decode.engine import generate_steps, make_prompt_batch, synchronize
from d3cli.core.decode.schedule import DecaySchedule, StaticSchedule
from d3cli.core.model.model_facts import model_device


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
    return prefill_and_decode_seconds(model, prompt_ids, schedule, tokens)[1]


def prefill_and_decode_seconds(model, prompt_ids: Sequence[int], schedule: DecaySchedule,
                               tokens: int) -> tuple[float, list[float]]:
    """Wall seconds of the prompt's prefill (step 0, its first token included) and of each decode step after it
    (steps 1..tokens−1) of greedy decoding with `schedule`."""
    batch = make_prompt_batch([list(prompt_ids)], pad_token_id=0, device=model_device(model))
    durations, started = [], time.perf_counter()
    last = prefill = None
    for step in generate_steps(model, batch, schedule, max_new_tokens=tokens):
        synchronize(model)
        now = time.perf_counter()
        if step.index > 0:
            durations.append(now - last)
        else:
            prefill = now - started
        last = now
    return prefill, durations


def measure_step_costs(model, prompt_ids: Sequence[int], base: DecaySchedule, depths: Sequence[int] | None = None,
                       tokens: int = 24, repeats: int = 3) -> StepCosts:
    """Median step time at several fixed depths (a warm-up run excluded), and the straight line through them.
    The depths take turns within each repeat, so a drift in machine speed bends no part of the line alone."""
    num_layers = base.num_layers
    if depths is None:
        floor = base.head + base.tail
        depths = sorted({num_layers, floor, *(floor + (num_layers - floor) * part // 4 for part in (1, 2, 3))})
    decode_seconds(model, prompt_ids, DecaySchedule.full(num_layers), min(tokens, 8))  # warm-up
    schedules = [StaticSchedule.like(base, depth) for depth in depths]
    step_seconds: list[list[float]] = [[] for _ in schedules]
    for _ in range(repeats):
        for seconds, schedule in zip(step_seconds, schedules):
            seconds.extend(decode_seconds(model, prompt_ids, schedule, tokens))
    samples = [(schedule.depth, statistics.median(seconds)) for schedule, seconds in zip(schedules, step_seconds)]
    t_fixed, t_layer, r2 = fit_line(samples)
    return StepCosts(num_layers, max(t_fixed, 0.0), max(t_layer, 1e-9), r2, tuple(samples))


def measured_decode_speedup(model, prompts: Sequence[Sequence[int]], schedule: DecaySchedule,
                            reply_tokens: int, repeats: int = 1) -> float:
    """Decode time at full depth over decode time with `schedule`: each step's median over `repeats` rounds, summed
    over the steps and prompts (a median per step drops a stall that hit one round). The two alternate per prompt,
    each going first in every other round, so drifts in machine speed hit both alike."""
    full = DecaySchedule.full(schedule.num_layers)
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
