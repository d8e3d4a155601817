"""Prompts made ready to decode, grouped into batches, and decoded with D3 and (for a comparison) at full depth.

What `d3 generate` does between parsing and rendering, for one prompt or a stream of them: encode each prompt (chat
template, context check) with the settings its reply uses, group consecutive prompts whose settings can share a
batch, and decode a batch under its D3 plan or the full-depth one. No rendering here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from d3cli.base.errors import UserError
from d3cli.core.decode.results import Reply
from d3cli.core.session.settings import DecodeSettings
from d3cli.core.text.prompts import check_fits_context, encode_prompt

WARMUP_TOKENS = 4  # untimed tokens decoded before a comparison


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt ready to decode: its token ids and the settings its reply uses."""

    token_ids: list[int]
    settings: DecodeSettings
    line: int | None = None  # input line number, for --jsonl
    request_id: object = None  # the line's "id", echoed back


def prepare_prompt(loaded, prompt: str, settings: DecodeSettings, line: int | None = None,
                   request_id=None) -> PreparedPrompt:
    """`prompt` encoded for `loaded` as `settings` ask (chat template or not, system message); a UserError when it
    does not fit the model's context."""
    from d3cli.core.model.model_facts import context_length  # here: the CLI imports this module, and no torch

    token_ids = encode_prompt(loaded.tokenizer, prompt, settings.chat, settings.system)
    check_fits_context(len(token_ids), context_length(loaded.model))
    return PreparedPrompt(token_ids, settings, line, request_id)


def plans(loaded, settings: DecodeSettings):
    """The D3 plan of these settings for this model, and the full-depth one to compare it with."""
    from d3cli.core.session.plan import plan_for

    return plan_for(loaded, settings), plan_for(loaded, settings.full_depth())


def decode(loaded, prompts: list[PreparedPrompt], plan, on_event=None, seed: int | None = None) -> list[Reply]:
    """Decode prompts that share their settings in one batch, with `plan` (made from those settings)."""
    from d3cli.core.decode import engine

    return engine.decode(loaded, [prompt.token_ids for prompt in prompts], plan, on_event=on_event, seed=seed)


def comparison_seed(settings: DecodeSettings) -> int | None:
    """Both runs of a comparison must draw the same random numbers: a seed is fixed when sampling without one."""
    if settings.sampling.greedy or settings.sampling.seed is not None:
        return settings.sampling.seed
    return random.randrange(2**31)


def warm_up(loaded, prompt: PreparedPrompt, full_depth_plan) -> None:
    """A few untimed tokens first, so a comparison does not charge one-time costs to whichever run goes first."""
    decode(loaded, [prompt], full_depth_plan.with_settings(max_new_tokens=WARMUP_TOKENS, stop=()))


def batches(prepared_prompts, batch_size: int):
    """Consecutive prompts whose settings allow one batch, at most `batch_size` at a time, in input order.

    A batch is handed out as soon as it is full; when a bad line stops the input, the good lines before it are
    still decoded first.
    """
    batch: list[PreparedPrompt] = []
    prompts = iter(prepared_prompts)
    while True:
        try:
            prepared = next(prompts)
        except StopIteration:
            break
        except UserError:
            if batch:
                yield batch
            raise
        if batch and prepared.settings.batch_key() != batch[0].settings.batch_key():
            yield batch
            batch = []
        batch.append(prepared)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
