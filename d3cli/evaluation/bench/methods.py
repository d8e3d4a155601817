"""The methods `d3 bench` runs (full depth, D3, and the matched static and linear baselines, each plain or with
bridges), and the plan each decodes with."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from d3cli.base.errors import UserError
from d3cli.core.decode.schedule import DecaySchedule, LinearSchedule, StaticSchedule
from d3cli.core.session.plan import plan_for
from d3cli.core.session.settings import DecodeSettings

BRIDGED = "+bridges"


@dataclass(frozen=True)
class MethodKind:
    """A kind of schedule `d3 bench` runs: its name, and its schedule made from the D3 schedule it goes with; a
    `matched` kind is a baseline whose schedule is fitted to the D3 run's mean depth (its finished records)."""

    name: str
    matched: bool
    schedule: object  # (d3 schedule, d3 records) -> schedule; None for full depth (the plan's own)
    bridgeable: bool = True  # comes as NAME+bridges too


def _d3_itself(d3_schedule: DecaySchedule, records: Sequence[dict]) -> DecaySchedule:
    return d3_schedule


def matched_static(d3_schedule: DecaySchedule, records: Sequence[dict]) -> StaticSchedule:
    """The one depth for tokens after the first whose mean over the D3 run's token counts is closest to D3's."""
    tokens = sum(record["tokens"] for record in records)
    target = sum(sum(record["layers"]) for record in records) / tokens
    examples = len(records)
    if tokens == examples:  # one-token replies: only the prefill's full depth
        return StaticSchedule.like(d3_schedule, d3_schedule.num_layers)
    depth = round((target * tokens - examples * d3_schedule.num_layers) / (tokens - examples))
    return StaticSchedule.like(d3_schedule, depth)


def matched_linear(d3_schedule: DecaySchedule, records: Sequence[dict]) -> LinearSchedule:
    """The slope whose mean depth over the D3 run's token counts is closest to D3's (bisection)."""
    lengths = [record["tokens"] for record in records]
    target = sum(sum(record["layers"]) for record in records) / sum(lengths)

    def mean_depth(slope: float) -> float:
        schedule = LinearSchedule.like(d3_schedule, slope)
        return sum(schedule.layers_at(i) for length in lengths for i in range(length)) / sum(lengths)

    low, high = 0.0, float(d3_schedule.num_layers)
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_depth(middle) > target else (low, middle)
    best = min((low, high), key=lambda slope: abs(mean_depth(slope) - target))
    return LinearSchedule.like(d3_schedule, best)


METHOD_KINDS: dict[str, MethodKind] = {kind.name: kind for kind in (
    MethodKind("full", matched=False, schedule=None, bridgeable=False),
    MethodKind("d3", matched=False, schedule=_d3_itself),
    MethodKind("static", matched=True, schedule=matched_static),
    MethodKind("linear", matched=True, schedule=matched_linear),
)}  # the registry of what `d3 bench --methods` can name

METHODS = tuple(name for kind in METHOD_KINDS.values() for name in
                ((kind.name, f"{kind.name}{BRIDGED}") if kind.bridgeable else (kind.name,)))

DEFAULT_METHODS = ("full", "d3", f"d3{BRIDGED}", "static", f"static{BRIDGED}", "linear")


@dataclass(frozen=True)
class MethodRun:
    method: str  # full, d3, static, linear
    alpha: float | None  # the D3 α this run is, or is matched to
    bridged: bool = False  # the calibration's bridges stand in for skipped runs

    @property
    def name(self) -> str:
        return f"{self.method}{BRIDGED}" if self.bridged else self.method

    @property
    def key(self) -> str:
        return self.name if self.alpha is None else f"{self.name}@{self.alpha:g}"

    @property
    def matched_d3(self) -> MethodRun:
        """The D3 run a baseline is matched to (itself for a D3 run)."""
        return MethodRun("d3", self.alpha, self.bridged)

    @property
    def label(self) -> str:
        if self.method == "full":
            return "full"
        return f"{self.name} α={self.alpha:g}"  # a baseline's α: the D3 run whose mean depth it matches


def default_methods(d3_schedule: DecaySchedule) -> tuple[str, ...]:
    """What `d3 bench` runs when --methods is not given: the bridged methods only when there are bridges."""
    if d3_schedule.bridge_maps is None:
        return tuple(method for method in DEFAULT_METHODS if not method.endswith(BRIDGED))
    return DEFAULT_METHODS


def method_runs(methods: Sequence[str], alphas: Sequence[float]) -> list[MethodRun]:
    """`full` first, then every D3 run (plain, then bridged), then the baselines matched to each D3 run. An α of 1
    is full depth itself (no layer skipped, no bridge applied): it adds no run beside `full`."""
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r} (choose from: {', '.join(METHODS)})")
    matched_kinds = [kind.name for kind in METHOD_KINDS.values() if kind.matched]
    for bridged in ("", BRIDGED):
        baselines = [f"{name}{bridged}" for name in matched_kinds if f"{name}{bridged}" in methods]
        if baselines and f"d3{bridged}" not in methods:
            raise UserError(f"{' and '.join(baselines)} {'is' if len(baselines) == 1 else 'are'} matched to a "
                            f"d3{bridged} run: add d3{bridged} to --methods")
    def wanted(method: str, alpha: float) -> list[MethodRun]:
        return [MethodRun(method, alpha, bridged) for bridged in (False, True)
                if f"{method}{BRIDGED if bridged else ''}" in methods]

    runs = [MethodRun("full", None)]
    skipping = [alpha for alpha in alphas if alpha < 1.0]
    runs += [run for alpha in skipping for run in wanted("d3", alpha)]
    runs += [run for alpha in skipping for method in matched_kinds for run in wanted(method, alpha)]
    return runs


def plan_for_run(run: MethodRun, loaded, settings: DecodeSettings, d3_records: Sequence[dict] = ()):
    """The DecodePlan of `run` for `loaded`: full depth, the D3 plan of `settings` at the run's α (its min-layers
    the user's, else the model's calibrated one), or a baseline matched to `d3_records`, the finished records
    (their "tokens" and "layers") of the D3 run `run.matched_d3`."""
    kind = METHOD_KINDS[run.method]
    if kind.schedule is None:
        return plan_for(loaded, settings.full_depth())
    d3_plan = plan_for(loaded, dataclasses.replace(settings, alpha=run.alpha))
    d3_schedule = d3_plan.schedule
    if run.bridged and d3_schedule.bridge_maps is None:
        raise UserError(f"{run.name} needs bridges: this model's calibration has none (make it with d3 calibrate), "
                        "or bridges are off")
    d3_schedule = d3_schedule.with_bridge_maps(d3_schedule.bridge_maps if run.bridged else None)
    if kind.matched and not d3_records:
        raise UserError(f"{run.label} is matched to the {run.matched_d3.label} run, which has no results")
    return d3_plan.with_schedule(kind.schedule(d3_schedule, d3_records))


def bench_alphas(loaded, settings: DecodeSettings, asked: Sequence[float] | None) -> tuple[float, ...]:
    """The D3 rates a bench runs: the ones asked for, else the one the model's plan has (calibrated or default)."""
    return tuple(asked) if asked else (plan_for(loaded, settings).schedule.alpha,)
