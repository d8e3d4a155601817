"""How long a calibration takes here, before it starts (`d3 calibrate --estimate`), and the smaller calibration that
fits a `--time-limit`."""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass

from d3cli.base.errors import UserError
from d3cli.core.decode.engine import decode
from d3cli.core.model.model_facts import num_decoder_layers
from d3cli.core.session.plan import plan_for
from d3cli.core.session.settings import DecodeSettings
from d3cli.evaluation.builtin_prompts import builtin_prompts, encode_builtin
from d3cli.evaluation.calibrate.options import CalibrationOptions
from d3cli.evaluation.calibrate.schedule_choice import expected_replies


@dataclass(frozen=True)
class StageCosts:
    """What a calibration's stages cost on this machine, measured once: a decode step at the batch size, and a
    forward over one reply's text."""

    step_s: float
    forward_s: float
    num_layers: int


def measure_costs(loaded, options: CalibrationOptions) -> StageCosts:
    """One short batch of replies timed now (its prefill and its decode steps)."""
    batch = min(options.batch_size, len(builtin_prompts(options.prompts)))
    probe = encode_builtin(loaded.tokenizer, *builtin_prompts(1)[0])
    steps = 4
    plan = plan_for(loaded, DecodeSettings(max_new_tokens=steps + 1).full_depth())
    times = []
    started = time.perf_counter()
    decode(loaded, [probe] * batch, plan, on_event=lambda event: times.append(time.perf_counter()))
    prefill_s = times[0] - started  # the batch's prompts, then each row's first token
    step_s = max(1e-4, (times[-1] - times[batch - 1]) / steps) if len(times) > batch else prefill_s
    forward_s = prefill_s / (batch * len(probe)) * (options.reply_tokens + len(probe))
    return StageCosts(step_s, forward_s, num_decoder_layers(loaded.model))


def estimate_from(costs: StageCosts, options: CalibrationOptions, schedule_only: bool = False) -> dict[str, float]:
    """About how long each stage takes: the replies (batches × reply tokens × a step), the layer profile (a forward
    per text and about L/2 more for its skip-alone passes), the bridges (a forward per text) and the schedule (an
    upper bound: every candidate's replies, as its progress bar counts them)."""
    prompts = len(builtin_prompts(options.prompts))
    held_out = options.schedule_prompts
    schedule = expected_replies(held_out, costs.num_layers - options.head - options.tail) / min(
        options.batch_size, held_out) * options.schedule_tokens * costs.step_s
    if schedule_only:
        return {"schedule": schedule}
    return {
        "corpus": -(-prompts // options.batch_size) * options.reply_tokens * costs.step_s,
        "profile": min(options.profile_texts, prompts) * (costs.num_layers / 2 + 1) * costs.forward_s,
        "bridges": prompts * costs.forward_s,
        "schedule": schedule,
    }


SMALLEST = {"prompts": 8, "profile_texts": 4, "schedule_prompts": 4}  # below these a calibration says little


TIME_LIMITED = {"prompts": "prompts the bridges are fitted on", "profile_texts": "replies the layer profile is "
                "measured on", "schedule_prompts": "held-out prompts the schedule is chosen on"}


def within_time(costs: StageCosts, options: CalibrationOptions, seconds: float,
                schedule_only: bool = False) -> CalibrationOptions:
    """`options` made smaller, the same fraction of each of prompts, profile texts and held-out prompts (never below
    SMALLEST), until the estimate fits `seconds`: the options themselves when they fit. A UserError when even the
    smallest calibration does not fit."""
    full = {"prompts": len(builtin_prompts(options.prompts)), "profile_texts": options.profile_texts,
            "schedule_prompts": options.schedule_prompts}
    fraction = 1.0
    while True:
        sizes = {name: max(min(SMALLEST[name], value), round(value * fraction)) for name, value in full.items()}
        smaller = dataclasses.replace(options, **sizes)
        total = sum(estimate_from(costs, smaller, schedule_only).values())
        if total <= seconds:
            return smaller
        if all(sizes[name] <= SMALLEST[name] for name in sizes if full[name] > SMALLEST[name]):
            listed = ", ".join(f"{value} {name.replace('_', ' ')}" for name, value in sizes.items())
            raise UserError(f"--time-limit {_minutes(seconds)}: even the smallest calibration ({listed}) takes about "
                            f"{_minutes(total)} here: give at least {_minutes(total * 1.1)}, or fewer --reply-tokens")
        fraction *= 0.9


def time_limit_cost(options: CalibrationOptions, limited: CalibrationOptions) -> str:
    """What a time limit cost: the sizes it cut, and what that weakens (empty when it cut nothing)."""
    before = {name: len(builtin_prompts(options.prompts)) if name == "prompts" else getattr(options, name)
              for name in TIME_LIMITED}
    cuts = [f"{getattr(limited, name)} of {before[name]} {label}" for name, label in TIME_LIMITED.items()
            if getattr(limited, name) != before[name]]
    if not cuts:
        return ""
    return (f"{'; '.join(cuts)}: bridges fitted on fewer tokens are weaker (and may overfit), and a schedule chosen "
            "on fewer replies is less certain to hold on others")


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "30m", "2h", "1h30m" or "1h30" (as on a clock: the bare number after hours is minutes,
    after minutes seconds); a UserError otherwise."""
    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)(s?))?\s*", text)
    if not text.strip() or match is None or not any(match.groups()[:3]):
        raise UserError(f"--time-limit takes a duration such as 90s, 30m, 2h or 1h30m, not {text!r}")
    hours, minutes, seconds = (float(group) if group else 0.0 for group in match.groups()[:3])
    if match[1] and not match[2] and match[3] and not match[4]:  # "1h30": thirty minutes
        minutes, seconds = seconds, 0.0
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise UserError(f"--time-limit must be above zero, not {text!r}")
    return total


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"

