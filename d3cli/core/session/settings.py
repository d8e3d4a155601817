"""What one reply needs besides its prompt: depth schedule, sampling, length, stops, prompt format. No torch here.

Command-line options, per-line JSONL options and saved chats all end up as a `DecodeSettings`; `plan.plan_for`
binds one to a loaded model. α and min-layers are None unless the user set them: the model's calibration then
chooses them, else d3's defaults (plan.py).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from d3cli.base.errors import UserError, check_at_least
from d3cli.core.calibration.layer_profile import load_profile
from d3cli.core.decode.sampling import SamplingSettings, check_temperature, check_top_k, check_top_p
from d3cli.core.decode.schedule import (
    AUTO_SKIP_ORDER,
    DEFAULT_HEAD,
    DEFAULT_SKIP_ORDER,
    DEFAULT_TAIL,
    DEFAULT_WARMUP,
    MEASURED_SKIP_ORDER,
    UNMEASURED_SKIP_ORDER,
    check_alpha,
    check_parameters,
    check_warmup,
    parse_layer_count,
)

DEFAULT_MAX_NEW_TOKENS = 256


def check_max_new_tokens(max_new_tokens: int) -> None:
    check_at_least("max-new-tokens", max_new_tokens, 1)


# The range of each numeric setting, checked by the one function that DecodeSettings (and its parts) call: a
# configuration file's values go through the same functions (cli/config.py).
VALUE_CHECKS = {
    "alpha": check_alpha,
    "warmup": check_warmup,
    "max_new_tokens": check_max_new_tokens,
    "temperature": check_temperature,
    "top_k": check_top_k,
    "top_p": check_top_p,
}


@dataclass(frozen=True)
class DecodeSettings:
    alpha: float | None = None  # None: the model's calibrated α, else the default (plan.py)
    min_layers: int | float | None = None  # None: the model's calibrated floor, else the default
    warmup: int = DEFAULT_WARMUP
    head: int | float = parse_layer_count(DEFAULT_HEAD, "head")
    tail: int | float = parse_layer_count(DEFAULT_TAIL, "tail")
    skip_order: str = DEFAULT_SKIP_ORDER
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    stop: tuple[str, ...] = ()
    chat: bool | None = None  # None: use the chat template when the tokenizer has one
    system: str | None = None
    profile: str | None = None  # a layer profile for --skip-order importance (None: the model's calibration's)
    calibration: str | None = None  # the model's calibration file (None: found in the cache, or the bundled one)
    bridges: bool = True  # bridge skipped runs with the calibration's fitted maps, when it has them

    def __post_init__(self) -> None:
        check_max_new_tokens(self.max_new_tokens)
        if self.chat is False and self.system is not None:
            raise UserError("--system needs the chat template; it cannot be combined with --no-chat")
        check_parameters(self.alpha, self.min_layers, self.warmup, self.head, self.tail, self.skip_order)  # (those set)
        if self.profile is not None and self.skip_order not in (MEASURED_SKIP_ORDER, AUTO_SKIP_ORDER):
            raise UserError(f"--profile is used by --skip-order importance only, not with skip order "
                            f"{self.skip_order!r}")
        if not isinstance(self.bridges, bool):
            raise UserError(f"bridges must be true or false, not {self.bridges!r}")

    @classmethod
    def from_options(cls, *, alpha, min_layers, warmup, head, tail, skip_order, max_new_tokens, temperature, top_k,
                     top_p, seed, stop, chat=None, system=None, profile=None, calibration=None,
                     bridges=True) -> DecodeSettings:
        """The settings of a subcommand's command-line options (layer counts as typed, the skip order's enum)."""
        return cls(
            alpha=alpha,
            min_layers=None if min_layers is None else parse_layer_count(min_layers, "min-layers"),
            warmup=warmup,
            head=parse_layer_count(head, "head"),
            tail=parse_layer_count(tail, "tail"),
            skip_order=getattr(skip_order, "value", skip_order),
            max_new_tokens=max_new_tokens,
            sampling=SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
            stop=tuple(stop or ()),
            chat=chat,
            system=system,
            profile=str(profile) if profile is not None else None,
            calibration=str(calibration) if calibration is not None else None,
            bridges=bridges,
        )

    def layer_profile(self, calibration=None):
        """The layer profile behind the importance order: --profile, else the calibration's, else None."""
        if self.profile is not None:
            return load_profile(self.profile)
        return getattr(calibration, "profile", None)

    def full_depth(self) -> DecodeSettings:
        """The same reply settings with no layer skipping: the baseline of --compare."""
        return dataclasses.replace(self, alpha=1.0, min_layers=1.0, warmup=0, skip_order=UNMEASURED_SKIP_ORDER,
                                   profile=None, bridges=False)  # no layer is skipped: no order, no bridges needed

    def batch_key(self) -> tuple:
        """Replies may share a batch when everything but the prompt format agrees (rows share each step's depth)."""
        return dataclasses.astuple(dataclasses.replace(self, chat=None, system=None))


# The options a JSONL line or a saved chat may carry, and the JSON type each must have.
OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "alpha": (int, float),
    "min_layers": (int, float, str),
    "warmup": (int,),
    "head": (int, float, str),
    "tail": (int, float, str),
    "skip_order": (str,),
    "max_new_tokens": (int,),
    "temperature": (int, float),
    "top_k": (int,),
    "top_p": (int, float),
    "seed": (int,),
    "stop": (str, list),
    "chat": (bool,),
    "system": (str,),
    "profile": (str,),
    "bridges": (bool,),
}
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "seed")
NULLABLE_KEYS = ("alpha", "min_layers", "seed", "chat", "system", "profile")  # null means "not set"


def did_you_mean(word: str, choices, prefix: str = "") -> str:
    """" (did you mean 'X'?)" for the closest of `choices` (written with `prefix`, e.g. a chat command's "/")."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def apply_options(base: DecodeSettings, options: dict, extra_keys: tuple[str, ...] = ()) -> DecodeSettings:
    """`base` with JSON-style options applied; raises UserError naming a bad key or value.

    `extra_keys` are keys the caller handles itself, offered in "did you mean" suggestions."""
    changes: dict[str, object] = {}
    sampling_changes: dict[str, object] = {}
    for key, value in options.items():
        expected = OPTION_TYPES.get(key)
        if expected is None:
            raise UserError(f"unknown key {key!r}{did_you_mean(key, [*OPTION_TYPES, *extra_keys])}")
        if value is None and key in NULLABLE_KEYS:
            pass
        elif isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
            names = " or ".join(kind.__name__ for kind in expected)
            raise UserError(f"key {key!r} must be {names}, not {json_type(value)}")
        if key in ("min_layers", "head", "tail") and value is not None:
            value = parse_layer_count(value, key.replace("_", "-"))
        if key == "stop":
            value = (value,) if isinstance(value, str) else tuple(value)
            if not all(isinstance(stop, str) for stop in value):
                raise UserError("key 'stop' must be a string or a list of strings")
        (sampling_changes if key in SAMPLING_KEYS else changes)[key] = value
    if sampling_changes:
        changes["sampling"] = dataclasses.replace(base.sampling, **sampling_changes)
    return dataclasses.replace(base, **changes)


def settings_as_options(settings: DecodeSettings) -> dict[str, object]:
    """The JSON-style options that `apply_options` turns back into these settings."""
    options = {key: getattr(settings, key) for key in OPTION_TYPES if key not in SAMPLING_KEYS}
    options.update({key: getattr(settings.sampling, key) for key in SAMPLING_KEYS})
    options["stop"] = list(settings.stop)
    return options


def json_type(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
