"""What a calibration is asked for: its options (checked once, where they are made) and whether they fit a model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from d3cli.base.errors import UserError, check_at_least
from d3cli.core.decode.bridges import DEFAULT_RIDGE
from d3cli.core.model.model_facts import num_decoder_layers
from d3cli.evaluation.builtin_prompts import SCHEDULE_PROMPTS
from d3cli.evaluation.calibrate.defaults import DEFAULT_NLL_BUDGET, SCHEDULE_TOKENS

LATE_FROM = 16  # the layer profile and the bridges look at reply positions from here on, where D3 skips most


@dataclass(frozen=True)
class CalibrationOptions:
    prompts: int | None = 64  # how many of the built-in prompts (None: all 128)
    reply_tokens: int = 256  # most tokens per reply
    batch_size: int = 16  # replies generated at once
    profile_texts: int = 16  # replies the layer profile is measured on
    ridge: float = DEFAULT_RIDGE
    rank: int | None = None  # None: full-rank bridges
    head: int = 2  # the core layers the bridged runs avoid (as the schedule's defaults)
    tail: int = 2
    fewest_layers: int | None = None  # bridges for depths down to this (None: head + tail)
    budget: float = DEFAULT_NLL_BUDGET  # the chosen schedule's replies: at most this much NLL above full depth's
    schedule_prompts: int = SCHEDULE_PROMPTS  # held-out prompts the candidate schedules answer
    schedule_tokens: int = SCHEDULE_TOKENS  # most tokens per such reply

    def __post_init__(self) -> None:
        for name, value, least in (("--prompts", self.prompts, 1), ("--reply-tokens", self.reply_tokens, LATE_FROM + 2),
                                   ("--batch-size", self.batch_size, 1), ("--profile-texts", self.profile_texts, 1),
                                   ("--rank", self.rank, 1), ("--schedule-prompts", self.schedule_prompts, 1),
                                   ("--schedule-tokens", self.schedule_tokens, 8)):
            if value is not None:
                check_at_least(name, value, least)
        if not self.ridge > 0:
            raise UserError(f"--ridge must be above 0, not {self.ridge}")
        if not self.budget > 0:
            raise UserError(f"--budget must be above 0 nats per token, not {self.budget}")


Progress = Callable[[str, int], None]  # (stage, amount done since the last call)


def check_fits(loaded, options: CalibrationOptions) -> int:
    """The model's layer count, once the options are known to fit it (a UserError if not)."""
    num_layers = num_decoder_layers(loaded.model)
    if options.head + options.tail >= num_layers:
        raise UserError(f"head + tail ({options.head} + {options.tail}) leave no layer of {num_layers} to skip")
    return num_layers

