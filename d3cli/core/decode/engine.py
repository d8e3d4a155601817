"""The D3 decoding engine: prefill at full depth, then one forward per token through only the kept layers.

A ladder of small functions, each used by the one above it:

    prefill / decode_one_token   one forward pass of the model with its own cache object
    generate_steps               the loop: schedule -> kept layers -> forward -> sampler, one `Step` per position
    stream_generate              detokenizing, EOS and stop strings, timing: one `TokenEvent` per generated token
    generate                     the replies, gathered from the events (partial ones too, on Ctrl-C)
    stream_decode / decode       the entry point of every command: a loaded model, prompts and a DecodePlan
                                 (plan.py: schedule, sampler, stop strings, reply length clamped to the context)
                                 -> events / replies

Commands (generate, chat, bench, calibrate, profile-ppl's corpora) call `stream_decode` or `decode`; timing and
scoring code that needs single steps uses `generate_steps`. Sampling and stopping come in as settings, never as CLI
flags.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from d3cli.core.decode.native_step import native_decoder
from d3cli.core.decode.results import (  # noqa: F401 (TokenEvent, GenerationInterrupted: what it yields and raises)
    GenerationInterrupted,
    Reply,
    ReplyCollector,
    TokenEvent,
)
from d3cli.core.decode.sampling import Sampler, greedy, make_sampler
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.core.decode.skipping import LayerSkipper
from d3cli.core.model.kv_buffers import ReservingCache
from d3cli.core.model.model_facts import model_device
from d3cli.core.text.detokenize import ReplyText


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts with the positions each row's tokens really have."""

    input_ids: torch.Tensor  # [batch, longest prompt]
    attention_mask: torch.Tensor | None  # [batch, longest prompt]; None when no row is padded
    position_ids: torch.Tensor  # [batch, longest prompt]
    prompt_lengths: tuple[int, ...]

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def make_prompt_batch(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str, past_length: int = 0
) -> PromptBatch:
    """Left-pad token id lists into one batch; positions count only real tokens, as `model.generate` does.

    `past_length` continues one sequence whose first `past_length` positions are already in the cache (chat).
    """
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    if past_length and len(prompts) != 1:
        raise ValueError("only a single sequence can continue a cache")
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, longest - len(prompt) :] = 1
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0) + past_length
    padded = bool((mask == 0).any())
    return PromptBatch(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device) if padded else None,
        position_ids=position_ids.to(device),
        prompt_lengths=tuple(len(prompt) for prompt in prompts),
    )


@dataclass(frozen=True)
class Step:
    """One decoding position for the whole batch: the token chosen per row, its logits, and the layers that ran."""

    index: int  # i: 0 is the token produced by the prefill
    token_ids: torch.Tensor  # [batch]
    logits: torch.Tensor  # [batch, vocab], float32
    kept_layers: tuple[int, ...]


def new_cache(model):
    """A fresh cache for a reply of `model`: its own kind (`model.new_cache()`, d3's own model) or, for a
    transformers model, kv_cache.DepthDecayCache."""
    own = getattr(model, "new_cache", None)
    if own is not None:
        return own()
    from d3cli.core.decode.kv_cache import DepthDecayCache  # transformers' cache: imported only for its models

    return DepthDecayCache(config=model.config)


def cache_argument(model, cache) -> dict:
    """The keyword argument that hands `cache` to the model's forward: `cache` from transformers 5.24 on (where the
    old name warns), `past_key_values` before."""
    return {_cache_keyword(type(model)): cache}


@functools.cache
def _cache_keyword(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def synchronize(model: torch.nn.Module) -> None:
    """Wait for the model's device to finish queued work, so a clock read after it measures that work."""
    if model_device(model).type == "cuda":
        torch.cuda.synchronize()


def prefill(model, batch: PromptBatch, cache: ReservingCache) -> torch.Tensor:
    """Run the whole prompt through every layer; return the next-token logits per row."""
    output = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        **cache_argument(model, cache),
        use_cache=True,
        logits_to_keep=1,
    )
    return output.logits[:, -1, :].float()


def decode_one_token(
    model,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: ReservingCache,
) -> torch.Tensor:
    """Run one new token per row through the layers that are currently kept; return the next-token logits. Without
    padding, a model whose layers run on d3's kernels takes its native step (native_step.py: the same logits, less
    Python)."""
    native = native_decoder(model) if attention_mask is None else None
    if native is not None:
        return native.step(input_ids, position_ids, cache)
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **cache_argument(model, cache),
        use_cache=True,
    )
    return output.logits[:, -1, :].float()


@torch.inference_mode()
def generate_steps(
    model,
    batch: PromptBatch,
    schedule: DecaySchedule,
    sampler: Sampler = greedy,
    max_new_tokens: int = 256,
    finished: torch.Tensor | None = None,
    pad_token_id: int = 0,
    cache: ReservingCache | None = None,
) -> Iterator[Step]:
    """Yield one `Step` per generated position, up to `max_new_tokens` or until every row is finished.

    `finished` is a [batch] bool tensor the caller may set while iterating: a finished row is fed `pad_token_id`
    from then on and its tokens mean nothing. All rows share the layer set of step i.
    """
    device = model_device(model)
    if finished is None:
        finished = torch.zeros(batch.size, dtype=torch.bool, device=device)
    if cache is None:
        cache = new_cache(model)
    attention_mask = batch.attention_mask
    position_ids = batch.position_ids[:, -1:]
    next_input = None  # the tokens fed to the next step: each row's last token, or padding once it is finished
    with LayerSkipper(model, schedule.bridge_maps) as skipper:
        if skipper.num_layers != schedule.num_layers:
            raise ValueError(f"schedule is for {schedule.num_layers} layers, the model has {skipper.num_layers}")
        logits = prefill(model, batch, cache)
        for index in range(max_new_tokens):
            kept_layers = schedule.kept_layers(index)
            if index > 0:
                stopped = skipper.kept.difference(kept_layers)
                skipper.keep(kept_layers)  # the one place where layers stop running
                cache.compact(stopped)  # a layer that stops never runs again in this reply: no spare room needed
                position_ids = position_ids + 1
                if attention_mask is not None:
                    attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch.size, 1))], dim=-1)
                logits = decode_one_token(model, next_input[:, None], position_ids, attention_mask, cache)
            token_ids = sampler(logits)
            yield Step(index=index, token_ids=token_ids, logits=logits, kept_layers=kept_layers)
            if bool(finished.all()):
                return
            next_input = torch.where(finished, torch.full_like(token_ids, pad_token_id), token_ids)


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """Every id that ends a reply: the generation config's EOS ids and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(token) for token in configured)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def pad_token_id(tokenizer, eos_ids: frozenset[int]) -> int:
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    return min(eos_ids) if eos_ids else 0


def stream_generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    schedule: DecaySchedule,
    sampler: Sampler = greedy,
    max_new_tokens: int = 256,
    stop_strings: Sequence[str] = (),
    eos_ids: frozenset[int] | None = None,
    cache: ReservingCache | None = None,
    past_length: int = 0,
) -> Iterator[TokenEvent]:
    """Decode a batch of tokenized prompts with D3; yield a `TokenEvent` per generated token per row.

    Each row stops on its own: at an EOS token (kept in the reply's token ids, not in its text), at a stop string
    (the text ends before it), or after `max_new_tokens` tokens. A chat passes its `cache`, whose first
    `past_length` positions (held by every layer) precede the single prompt given.
    """
    eos_ids = eos_token_ids(model, tokenizer) if eos_ids is None else eos_ids
    pad_id = pad_token_id(tokenizer, eos_ids)
    device = model_device(model)
    batch = make_prompt_batch(prompts, pad_id, device, past_length)
    finished = torch.zeros(batch.size, dtype=torch.bool, device=device)
    replies = [ReplyText(tokenizer, stop_strings) for _ in prompts]
    started = time.perf_counter()
    steps = generate_steps(model, batch, schedule, sampler, max_new_tokens, finished, pad_id, cache)
    try:
        for step in steps:
            token_ids = step.token_ids.tolist()
            elapsed_s = time.perf_counter() - started
            for row, token_id in enumerate(token_ids):
                if finished[row]:
                    continue
                reply = replies[row]
                text = reply.add(token_id)
                finish_reason = None
                if token_id in eos_ids:
                    finish_reason = "eos"
                elif reply.stopped:
                    finish_reason = "stop"
                elif step.index + 1 >= max_new_tokens:
                    finish_reason = "length"
                if finish_reason is not None:
                    text += reply.finish()
                    finished[row] = True
                yield TokenEvent(row, step.index, token_id, text, len(step.kept_layers), elapsed_s, finish_reason)
    finally:
        steps.close()


def generate(model, tokenizer, prompts: Sequence[Sequence[int]], schedule: DecaySchedule, *, on_event=None,
             **options) -> list[Reply]:
    """`stream_generate` (its `options`: sampler, max_new_tokens, stop_strings, eos_ids, cache, past_length),
    collected: one `Reply` per prompt; `on_event(event)` sees every token as it comes."""
    return collect(stream_generate(model, tokenizer, prompts, schedule, **options), len(prompts), on_event)


def collect(events: Iterator[TokenEvent], rows: int, on_event=None) -> list[Reply]:
    """Drain an event stream into one `Reply` per row. On Ctrl-C `GenerationInterrupted` carries the partial
    replies; the stream is closed at once either way, so the model gets its own layers back."""
    collector = ReplyCollector(rows)
    try:
        for event in events:
            collector.add(event)
            if on_event is not None:
                on_event(event)
    except KeyboardInterrupt:
        collector.mark_interrupted()
        raise GenerationInterrupted(collector.replies) from None
    finally:
        events.close()  # now, not whenever the generator is collected: the model gets its own layers back
    return collector.replies


def stream_decode(loaded, prompts: Sequence[Sequence[int]], plan, *, stop: Sequence[str] | None = None,
                  seed: int | None = None, cache: ReservingCache | None = None,
                  past_length: int = 0) -> Iterator[TokenEvent]:
    """The one decode entry point of every command: token-id prompts of `loaded` (a loader.LoadedModel) under `plan`
    (a plan.DecodePlan, from `plan.plan_for`): its schedule, its sampler (`seed` overrides its seed), its stop strings
    (or `stop`), and its reply length clamped so the longest prompt (after the `past_length` positions already in
    `cache`) plus its reply fits the model's context. Yields the engine's events."""
    longest = past_length + max(len(prompt) for prompt in prompts)
    sampling = plan.sampling if seed is None else dataclasses.replace(plan.sampling, seed=seed)
    sampler = make_sampler(sampling, model_device(loaded.model))
    return stream_generate(loaded.model, loaded.tokenizer, prompts, plan.schedule, sampler,
                           plan.max_new_tokens_for(longest), plan.stop if stop is None else stop, cache=cache,
                           past_length=past_length)


def decode(loaded, prompts: Sequence[Sequence[int]], plan, *, on_event=None, stop: Sequence[str] | None = None,
           seed: int | None = None, cache: ReservingCache | None = None, past_length: int = 0) -> list[Reply]:
    """`stream_decode`, collected: one `Reply` per prompt; `on_event(event)` sees every token as it comes. On Ctrl-C
    `GenerationInterrupted` carries the partial replies."""
    events = stream_decode(loaded, prompts, plan, stop=stop, seed=seed, cache=cache, past_length=past_length)
    return collect(events, len(prompts), on_event)
