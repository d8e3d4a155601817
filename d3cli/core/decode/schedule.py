"""The depth-decay schedule: how many layers run for generated token i, and which ones.

Pure Python, no torch. Generated token i (i = 0 is the token the prompt's prefill produces) runs

    k_i = L                                   for i < warmup
    k_i = clamp(floor(L * alpha**(i - warmup)), min_layers, L)   otherwise

layers. The first `head` and last `tail` layers are core layers and always run. The flex layers between them are
dropped in a fixed priority order (the skip order), so the layers kept at step i + 1 are a subset of those kept at
step i. That nesting is what keeps the KV cache exact: a layer a token skips is never run again in that reply, so
nobody ever reads the cache entry it did not write.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache

from d3cli.base.errors import UserError

# A skip order receives the flex layer indices in ascending order and returns the same indices in the order they
# are dropped (first element dropped first). A later issue adds one built from a measured importance profile.
SkipOrder = Callable[[Sequence[int]], Sequence[int]]


def drop_middle_first(flex_layers: Sequence[int]) -> list[int]:
    """The flex layer nearest the centre of the flex range first, then outward; of two equally near, the deeper."""
    if not flex_layers:
        return []
    centre = (flex_layers[0] + flex_layers[-1]) / 2
    return sorted(flex_layers, key=lambda layer: (abs(layer - centre), -layer))


def drop_late_first(flex_layers: Sequence[int]) -> list[int]:
    """The last flex layers first."""
    return sorted(flex_layers, reverse=True)


SKIP_ORDERS: dict[str, SkipOrder] = {
    "middle": drop_middle_first,
    "late": drop_late_first,
}
# "importance" drops the flex layers a measured layer profile found least important first (layer_profile.py); it
# needs that profile, so DecodeSettings builds it and hands the schedule a callable. "auto" is importance when the
# model has a calibration (model_calibration.py) or --profile, else middle.
MEASURED_SKIP_ORDER = "importance"
AUTO_SKIP_ORDER = "auto"
UNMEASURED_SKIP_ORDER = "middle"  # what auto means for a model d3 knows nothing about
SKIP_ORDER_NAMES = (AUTO_SKIP_ORDER, *SKIP_ORDERS, MEASURED_SKIP_ORDER)

# Defaults, chosen from measurements on the embedded SmolLM2-135M-Instruct (30 layers); docs/BRIDGES.md and
# docs/DEFAULTS.md have the numbers. A value with a decimal point is a fraction of the model's layer count.
# α and min-layers are what a model gets where neither the user nor its calibration chose them (core/session/plan.py): the
# schedule search of `d3 calibrate`, run on the embedded model without a calibration, found no schedule whose replies
# stay within the fidelity budget, so a model d3 knows nothing about decodes at full depth until calibrated.
DEFAULT_ALPHA = 1.0
DEFAULT_MIN_LAYERS = "0.84"  # 25 of 30, for a user who sets only α: the floor, not α, sets the cost of a long reply
DEFAULT_HEAD = "2"  # layers 0 and 1 are by far the costliest to skip
DEFAULT_TAIL = "2"  # then layers 29 and 28
DEFAULT_WARMUP = 0
# importance when the model is calibrated (bridges fitted for that order), middle otherwise
DEFAULT_SKIP_ORDER = AUTO_SKIP_ORDER


def parse_layer_count(text: str | int | float, name: str) -> int | float:
    """An int ("12") is a number of layers; a number with a decimal point ("0.5") is a fraction of L."""
    if isinstance(text, bool):
        raise UserError(f"{name} must be a whole number of layers or a fraction of them like 0.5, not {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise UserError(f"{name} must be >= 0, not {text}")
        return text
    if isinstance(text, float):
        value = text
    else:
        stripped = str(text).strip()
        try:
            return parse_layer_count(int(stripped), name)
        except ValueError:
            pass
        try:
            value = float(stripped)
        except ValueError:
            raise UserError(
                f"{name} must be a whole number of layers or a fraction of them like 0.5, not {text!r}"
            ) from None
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise UserError(f"{name} as a fraction of the layers must lie in [0, 1], not {text}")
    return value


def resolve_layer_count(value: int | float | str, num_layers: int, name: str) -> int:
    """Turn a layer count or fraction into a number of layers of a model with `num_layers` layers."""
    parsed = parse_layer_count(value, name)
    if isinstance(parsed, float):
        return math.floor(parsed * num_layers + 0.5)
    return parsed


def check_layer_counts(head: int, tail: int, min_layers: int, num_layers: int | None = None) -> None:
    """1 <= head + tail <= min_layers <= L."""
    if head + tail < 1:
        raise UserError("head + tail must keep at least one core layer (both are 0)")
    if num_layers is not None and min_layers > num_layers:
        raise UserError(f"min-layers is {min_layers} but the model has only {num_layers} layers")
    if head + tail > min_layers:
        raise UserError(
            f"head + tail ({head} + {tail}) must not exceed min-layers ({min_layers}): the core layers always run"
        )


def _core_within(floor: int, num_layers: int) -> tuple[int, int]:
    """The default core (head and tail) shrunk to fit a floor below it on a shallow model: half each, the head
    first, at least one layer."""
    core = max(1, min(floor, num_layers))
    return (core + 1) // 2, core // 2


def check_alpha(alpha: float) -> None:
    """The one check of a decay rate: a number in (0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or math.isnan(alpha):
        raise UserError(f"alpha must be a number in (0, 1], not {alpha!r}")
    if not 0.0 < alpha <= 1.0:
        raise UserError(f"alpha must lie in (0, 1], not {alpha:g}")


def check_warmup(warmup: int) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UserError(f"warmup must be a whole number of tokens >= 0, not {warmup!r}")


def check_parameters(
    alpha: float | None,
    min_layers: int | float | str | None,
    warmup: int,
    head: int | float | str,
    tail: int | float | str,
    skip_order: str | SkipOrder,
) -> None:
    """Every check that does not need the model's layer count, so bad options fail before a model loads (α and
    min-layers when set: None leaves them to the model's calibration)."""
    if alpha is not None:
        check_alpha(alpha)
    check_warmup(warmup)
    counts = {name: parse_layer_count(value, name) for name, value in
              (("min-layers", min_layers), ("head", head), ("tail", tail)) if value is not None}
    if len(counts) == 3 and all(isinstance(count, int) for count in counts.values()):
        check_layer_counts(counts["head"], counts["tail"], counts["min-layers"])
    if not callable(skip_order) and skip_order not in SKIP_ORDER_NAMES:
        raise UserError(f"unknown skip order {skip_order!r} (choose from: {', '.join(SKIP_ORDER_NAMES)})")


@dataclass(frozen=True)
class DecaySchedule:
    """alpha, L, the floor, warmup, the core layers and the skip order: everything that decides the depth of a step."""

    num_layers: int
    alpha: float
    min_layers: int
    warmup: int
    head: int
    tail: int
    skip_order: str
    drop_order: tuple[int, ...] = field(repr=False)
    # What stands in for a run of skipped layers: None (each passes its input through) or the model's fitted bridges
    # (bridges.Bridges, opaque here). Never used at full depth, so alpha = 1 stays the model's own forward.
    bridge_maps: object = field(default=None, repr=False, compare=False)

    @classmethod
    def full(cls, num_layers: int) -> DecaySchedule:
        """Every layer at every step: the reference that D3 is measured against."""
        return cls.build(num_layers, alpha=1.0)

    @classmethod
    def build(
        cls,
        num_layers: int,
        alpha: float = DEFAULT_ALPHA,
        min_layers: int | float | str = DEFAULT_MIN_LAYERS,
        warmup: int = DEFAULT_WARMUP,
        head: int | float | str = DEFAULT_HEAD,
        tail: int | float | str = DEFAULT_TAIL,
        skip_order: str | SkipOrder = UNMEASURED_SKIP_ORDER,
        skip_order_name: str | None = None,
        bridge_maps: object = None,
    ) -> DecaySchedule:
        """Check every parameter (`check_parameters`), then `resolve` them against the model's layer count: for
        code that builds a schedule itself (a plan's settings were checked when they were made)."""
        check_parameters(alpha, min_layers, warmup, head, tail, skip_order)
        if not callable(skip_order) and skip_order in (MEASURED_SKIP_ORDER, AUTO_SKIP_ORDER):
            raise UserError(f"the {skip_order} skip order needs the model's layer profile (plan.plan_for finds it)")
        return cls.resolve(num_layers, alpha, min_layers, warmup, head, tail, skip_order, skip_order_name,
                           bridge_maps)

    @classmethod
    def resolve(
        cls,
        num_layers: int,
        alpha: float,
        min_layers: int | float | str,
        warmup: int,
        head: int | float | str,
        tail: int | float | str,
        skip_order: str | SkipOrder,
        skip_order_name: str | None = None,
        bridge_maps: object = None,
    ) -> DecaySchedule:
        """The schedule of parameters checked already (DecodeSettings checks a user's once, where they are made; a
        calibration's when it is read): the layer counts resolved against the model's `num_layers`, and checked
        against it (the one check that needs the model), and the drop order of the flex layers fixed. `skip_order`
        is a callable or the name of a fixed order (plan.plan_for resolves auto and importance)."""
        if not isinstance(num_layers, int) or num_layers < 1:
            raise UserError(f"the model must have at least one layer, not {num_layers!r}")
        head_layers = resolve_layer_count(head, num_layers, "head")
        tail_layers = resolve_layer_count(tail, num_layers, "tail")
        floor = resolve_layer_count(min_layers, num_layers, "min-layers")
        if (str(head), str(tail)) == (DEFAULT_HEAD, DEFAULT_TAIL) and head_layers + tail_layers > floor:
            head_layers, tail_layers = _core_within(floor, num_layers)  # the defaults fit any model
        check_layer_counts(head_layers, tail_layers, floor, num_layers)

        if callable(skip_order):
            order_fn, order_name = skip_order, skip_order_name or getattr(skip_order, "__name__", "custom")
        else:
            order_fn, order_name = SKIP_ORDERS[skip_order], skip_order
        flex_layers = list(range(head_layers, num_layers - tail_layers))
        drop_order = tuple(int(layer) for layer in order_fn(flex_layers))
        if sorted(drop_order) != flex_layers:
            raise UserError(f"skip order {order_name!r} must return each flex layer exactly once")

        return cls(
            num_layers=num_layers,
            alpha=float(alpha),
            min_layers=floor,
            warmup=warmup,
            head=head_layers,
            tail=tail_layers,
            skip_order=order_name,
            drop_order=drop_order,
            bridge_maps=bridge_maps,
        )

    def retuned(self, alpha: float, min_layers: int) -> DecaySchedule:
        """The same core layers and drop order with another α and floor (validated like `build`)."""
        check_parameters(alpha, min_layers, self.warmup, self.head, self.tail, lambda flex: flex)  # order is fixed
        check_layer_counts(self.head, self.tail, min_layers, self.num_layers)
        return DecaySchedule(num_layers=self.num_layers, alpha=float(alpha), min_layers=min_layers,
                             warmup=self.warmup, head=self.head, tail=self.tail, skip_order=self.skip_order,
                             drop_order=self.drop_order, bridge_maps=self.bridge_maps)

    def layers_at(self, step: int) -> int:
        """k_i: how many layers run for generated token `step`."""
        if step < self.warmup:
            return self.num_layers
        decayed = math.floor(self.num_layers * self.alpha ** (step - self.warmup))
        return max(self.min_layers, min(self.num_layers, decayed))

    def kept_layers(self, step: int) -> tuple[int, ...]:
        """The sorted indices of the layers that run for generated token `step`."""
        return _kept_for_depth(self.num_layers, self.drop_order, self.layers_at(step))

    def is_full_depth(self) -> bool:
        """True when every step runs every layer (alpha = 1 or a floor of L)."""
        return self.alpha == 1.0 or self.min_layers == self.num_layers

    def depths(self, steps: int) -> list[int]:
        """The distinct depths of steps 0..steps-1, deepest first."""
        return sorted({self.layers_at(step) for step in range(steps)}, reverse=True)

    def runs_at(self, step: int) -> tuple[tuple[int, int], ...]:
        """The runs of consecutive layers that step `step` skips, as (first, last) pairs."""
        return skipped_runs(self.kept_layers(step), self.num_layers)

    def with_bridge_maps(self, bridge_maps: object) -> DecaySchedule:
        """The same schedule with other stand-ins for skipped runs (None: plain skipping)."""
        return dataclasses.replace(self, bridge_maps=bridge_maps)

    @property
    def method(self) -> str:
        return "d3"


def _base_fields(schedule: DecaySchedule) -> dict[str, object]:
    return {item.name: getattr(schedule, item.name) for item in fields(DecaySchedule)}


@dataclass(frozen=True)
class StaticSchedule(DecaySchedule):
    """A baseline without position awareness: every generated token after the first runs the same `depth` layers,
    dropped in the same skip order (the first token comes from the full-depth prefill, as in D3)."""

    depth: int = 0

    @classmethod
    def like(cls, schedule: DecaySchedule, depth: int) -> StaticSchedule:
        depth = max(schedule.head + schedule.tail, min(schedule.num_layers, depth))
        return cls(**_base_fields(schedule), depth=depth)

    def layers_at(self, step: int) -> int:
        return self.num_layers if step == 0 else self.depth

    def is_full_depth(self) -> bool:
        return self.depth == self.num_layers

    @property
    def method(self) -> str:
        return "static"


@dataclass(frozen=True)
class LinearSchedule(DecaySchedule):
    """A SkipDecode-style baseline: depth falls linearly with position, `slope` layers per token, down to the core
    layers (head + tail), dropped in the same skip order."""

    slope: float = 0.0

    @classmethod
    def like(cls, schedule: DecaySchedule, slope: float) -> LinearSchedule:
        base = _base_fields(schedule) | {"min_layers": schedule.head + schedule.tail}
        return cls(**base, slope=max(0.0, slope))

    def layers_at(self, step: int) -> int:
        depth = math.floor(self.num_layers - self.slope * step + 0.5)
        return max(self.min_layers, min(self.num_layers, depth))

    def is_full_depth(self) -> bool:
        return self.slope == 0.0

    @property
    def method(self) -> str:
        return "linear"


@lru_cache(maxsize=4096)
def _kept_for_depth(num_layers: int, drop_order: tuple[int, ...], depth: int) -> tuple[int, ...]:
    dropped = set(drop_order[: num_layers - depth])
    return tuple(layer for layer in range(num_layers) if layer not in dropped)


def skipped_runs(kept_layers: Sequence[int], num_layers: int) -> tuple[tuple[int, int], ...]:
    """The maximal runs of consecutive layers not in `kept_layers`, as (first, last) pairs in layer order.

    A bridge stands in for one such run: it maps the run's input (the output of layer first - 1) to an estimate of
    the output of layer last."""
    kept = set(kept_layers)
    runs, start = [], None
    for layer in range(num_layers):
        if layer not in kept and start is None:
            start = layer
        elif layer in kept and start is not None:
            runs.append((start, layer - 1))
            start = None
    if start is not None:
        runs.append((start, num_layers - 1))
    return tuple(runs)


def runs_at_depths(num_layers: int, drop_order: Sequence[int], depths) -> list[tuple[int, int]]:
    """The skipped runs of the given depths under `drop_order`, each once, in order of first appearance."""
    found: list[tuple[int, int]] = []
    for depth in depths:
        for run in skipped_runs(_kept_for_depth(num_layers, tuple(drop_order), depth), num_layers):
            if run not in found:
                found.append(run)
    return found


def runs_of_drop_order(num_layers: int, drop_order: Sequence[int], fewest_layers: int) -> tuple[tuple[int, int], ...]:
    """Every run that some depth from L - 1 down to `fewest_layers` skips under `drop_order`: one new run per
    dropped layer (the run that layer joins), so at most L of them. These are the bridges a calibration fits."""
    lowest = max(fewest_layers, num_layers - len(drop_order))
    return tuple(runs_at_depths(num_layers, drop_order, range(num_layers - 1, lowest - 1, -1)))
