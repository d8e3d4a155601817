"""A reply's settings bound to one loaded model: the DecodePlan every command decodes with, resolved in one place.

    DecodeSettings (what the user asked: options, configuration files, environment, a JSONL line, a request)
      + the loaded model (its layer count, its calibration, its context)
      = DecodePlan: the depth schedule (α and min-layers from the user where set, else the schedule the model's
        calibration chose, else d3's default for a model without one; the skip order resolved; the calibration's
        bridges), the sampling settings, the stop strings, the reply length, and where each part came from.

`plan_for` (and `plan_of`, the same without a loaded model) is the only place that turns settings into a schedule.
Commands, the server, the benchmarks and the lm-eval model hand a plan to the engine (`engine.stream_decode(loaded,
prompts, plan)`); a benchmark's baselines are the same plan with another schedule (`with_schedule`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from d3cli.base.errors import UserError
from d3cli.core.decode.sampling import SamplingSettings
from d3cli.core.decode.schedule import (
    AUTO_SKIP_ORDER,
    DEFAULT_ALPHA,
    DEFAULT_MIN_LAYERS,
    MEASURED_SKIP_ORDER,
    UNMEASURED_SKIP_ORDER,
    DecaySchedule,
    parse_layer_count,
)
from d3cli.core.session.settings import DecodeSettings

OPTION, CALIBRATION, DEFAULT = "option", "calibration", "default"  # where a schedule setting came from
SCHEDULE_KEYS = ("alpha", "min_layers")  # the settings a calibration may choose


@dataclass(frozen=True)
class DecodePlan:
    """Everything a reply needs besides its prompt, for one model."""

    settings: DecodeSettings  # as asked (None where the user set no α or min-layers)
    schedule: DecaySchedule
    calibration: object = None  # model_calibration.ModelCalibration in use, or None
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)  # "alpha", "min_layers" -> OPTION, ...
    context: int | None = None  # the model's context length in tokens, when it has one

    @property
    def sampling(self) -> SamplingSettings:
        return self.settings.sampling

    @property
    def stop(self) -> tuple[str, ...]:
        return self.settings.stop

    @property
    def max_new_tokens(self) -> int:
        return self.settings.max_new_tokens

    @property
    def schedule_source(self) -> str:
        """Where the schedule came from: `option` when the user set α or min-layers (the other part then comes
        from the calibration or the default), `calibration` when the model's calibration chose it, else
        `default`."""
        values = set(self.sources.values())
        return OPTION if OPTION in values else CALIBRATION if CALIBRATION in values else DEFAULT

    @property
    def past_calibration(self) -> str | None:
        """One line when the user's α or min-layers decays further than the model's calibration found safe (its
        replies then drift or loop more than its budget allowed), else None."""
        chosen = calibrated_schedule(self.calibration)
        schedule = self.schedule
        if chosen is None or self.schedule_source != OPTION or schedule.is_full_depth():
            return None
        safe_alpha, safe_floor = chosen.get("alpha", 1.0), chosen.get("min_layers", schedule.num_layers)
        if safe_alpha == 1.0:
            return (f"α {schedule.alpha:g} skips layers, but this model's calibration found no schedule whose replies "
                    "stay within its budget (it chose full depth): replies may drift or loop")
        if schedule.alpha < safe_alpha or schedule.min_layers < safe_floor:
            return (f"α {schedule.alpha:g} with min-layers {schedule.min_layers} decays further than this model's "
                    f"calibration found safe (α {safe_alpha:g}, min-layers {safe_floor}): replies may drift or loop")
        return None

    def max_new_tokens_for(self, longest_prompt: int) -> int:
        """The reply length, clamped so the longest prompt plus its reply fits the model's context."""
        if self.context is None:
            return self.max_new_tokens
        return min(self.max_new_tokens, self.context - longest_prompt)

    def with_schedule(self, schedule: DecaySchedule) -> DecodePlan:
        """The same plan with another schedule (a benchmark's matched baseline)."""
        return dataclasses.replace(self, schedule=schedule)

    def with_settings(self, **changes) -> DecodePlan:
        """The same plan with reply settings that leave the schedule alone (length, stops, sampling)."""
        return self.for_settings(dataclasses.replace(self.settings, **changes))

    def for_settings(self, settings: DecodeSettings) -> DecodePlan:
        """The same schedule with another reply's length, stops and sampling (lm-eval's per-request options)."""
        return dataclasses.replace(self, settings=settings)


def plan_for(loaded, settings: DecodeSettings) -> DecodePlan:
    """`settings` bound to `loaded` (a loader.LoadedModel, its calibration activated or None)."""
    # imported here: the CLI imports plan.py and must not import torch
    from d3cli.core.model.model_facts import context_length, num_decoder_layers

    return plan_of(settings, num_decoder_layers(loaded.model), loaded.calibration, context_length(loaded.model))


def plan_of(settings: DecodeSettings, num_layers: int, calibration=None, context: int | None = None) -> DecodePlan:
    """`settings` for a model with `num_layers` layers, this calibration (model_calibration.ModelCalibration, or
    None) and context length: what `plan_for` resolves, without a loaded model."""
    chosen = calibrated_schedule(calibration)
    values, sources = {}, {}
    for key in SCHEDULE_KEYS:
        asked = getattr(settings, key)
        if asked is not None:
            values[key], sources[key] = asked, OPTION
        elif chosen is not None and key in chosen:
            values[key], sources[key] = chosen[key], CALIBRATION
        else:
            values[key] = DEFAULT_ALPHA if key == "alpha" else parse_layer_count(DEFAULT_MIN_LAYERS, "min-layers")
            sources[key] = DEFAULT
    schedule = schedule_of(settings, num_layers, calibration, values["alpha"], values["min_layers"])
    return DecodePlan(settings, schedule, calibration, sources, context)


def calibrated_schedule(calibration) -> dict | None:
    """The α and min-layers a calibration chose (`d3 calibrate`'s schedule stage), or None: no calibration, or one
    made before calibrations chose schedules."""
    chosen = getattr(calibration, "schedule", None) if calibration is not None else None
    if not chosen:
        return None
    if chosen.get("alpha") == 1.0:  # full depth: no floor was chosen, so one the user's own α goes with is d3's
        return {"alpha": 1.0}
    return {key: chosen[key] for key in SCHEDULE_KEYS if key in chosen}


def schedule_of(settings: DecodeSettings, num_layers: int, calibration, alpha: float,
                min_layers: int | float) -> DecaySchedule:
    """The schedule of `settings` with this α and min-layers for a model with `num_layers` layers and
    `calibration`: the skip order `auto` resolved (importance from --profile or the calibration, else middle), and
    the calibration's bridges unless bridges are off."""
    from d3cli.core.calibration.layer_profile import importance_order

    profile = settings.layer_profile(calibration)
    skip_order, name = settings.skip_order, settings.skip_order
    if skip_order == AUTO_SKIP_ORDER:
        name = MEASURED_SKIP_ORDER if profile is not None else UNMEASURED_SKIP_ORDER
        skip_order = name
    if skip_order == MEASURED_SKIP_ORDER:
        if profile is None:
            raise UserError("--skip-order importance needs a layer profile of this model: make its calibration "
                            "with d3 calibrate, or pass --profile FILE")
        if profile.num_layers != num_layers:
            raise UserError(f"the layer profile {settings.profile} is for a model with {profile.num_layers} layers, "
                            f"this one has {num_layers}: make one with d3 profile-ppl --save-profile FILE")
        skip_order = importance_order(profile)
    bridges = None
    if settings.bridges and calibration is not None and calibration.active_bridges:
        bridges = calibration.active_bridges
    return DecaySchedule.resolve(num_layers, alpha, min_layers, settings.warmup, settings.head, settings.tail,
                                 skip_order, name, bridges)  # the settings were checked when they were made
