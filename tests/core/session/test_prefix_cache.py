"""The prompt cache: a kept reply's cache gives the next prompt the positions they share that every layer holds,
and what follows is decoded exactly as a fresh decode of the whole prompt would be (bit for bit on d3's kernels)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from native_models import tiny

from d3cli.core.decode import engine
from d3cli.core.decode.engine import make_prompt_batch, prefill
from d3cli.core.session.plan import plan_of
from d3cli.core.session.prefix_cache import PrefixCache, common_prefix_length, reusable_length
from d3cli.core.session.settings import DecodeSettings

SYSTEM = [1, 4093, 314, 260, 3575, 282, 4649, 47, 9519, 28, 2988, 30, 41, 52]  # a shared start (a system prompt)
FIRST = [*SYSTEM, 101, 102, 103]
SECOND = [*SYSTEM, 201, 202, 203, 204]


@dataclass
class HeldCache:
    held: int

    def held_by_every_layer(self) -> int:
        return self.held


def test_the_reusable_prefix_is_shared_held_by_every_layer_and_leaves_a_token_to_prefill():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix_length([], [1]) == 0
    assert reusable_length(None, [1, 2, 3], [1, 2, 3, 4]) == 0
    assert reusable_length(HeldCache(10), [1, 2, 3, 9], [1, 2, 3, 4]) == 3
    assert reusable_length(HeldCache(2), [1, 2, 3, 9], [1, 2, 3, 4]) == 2  # a decayed reply's layers hold less
    assert reusable_length(HeldCache(10), [1, 2, 3], [1, 2, 3]) == 2  # the same prompt: its last token is prefilled


def first_logits(model, cache, token_ids, past_length):
    with torch.inference_mode():
        return prefill(model, make_prompt_batch([token_ids], 0, "cpu", past_length), cache)


def test_a_kept_cache_gives_the_next_prompt_bit_identical_logits_and_tokens_on_d3s_kernels():
    model = tiny("llama", "int4")
    schedule = plan_of(DecodeSettings(alpha=0.8, min_layers=3, head=1, tail=1), 6).schedule
    prefix = PrefixCache(model)
    cache, reused = prefix.take(FIRST)
    assert reused == 0
    (first,) = engine.generate(model, _Tokenizer(), [FIRST], schedule, max_new_tokens=10, cache=cache)
    assert min(first.layers_per_token) < 6  # the reply decayed: its late tokens left layers behind
    prefix.keep(cache, FIRST, first.token_ids)
    assert cache.held_by_every_layer() == len(FIRST)  # only the prompt ran through every layer (step 1 skips)

    cache, reused = prefix.take(SECOND)
    assert reused == len(SYSTEM) and prefix.cache is None  # taken: nothing kept until the reply is done
    (cached,) = engine.generate(model, _Tokenizer(), [SECOND[reused:]], schedule, max_new_tokens=10, cache=cache,
                                past_length=reused)
    (fresh,) = engine.generate(model, _Tokenizer(), [SECOND], schedule, max_new_tokens=10)
    assert cached.token_ids == fresh.token_ids and cached.layers_per_token == fresh.layers_per_token

    kept = PrefixCache(model)
    kept.keep(*_replied(model, schedule, FIRST))
    cache, reused = kept.take(SECOND)
    assert torch.equal(first_logits(model, cache, SECOND[reused:], reused),
                       first_logits(model, engine.new_cache(model), SECOND, 0))


def test_a_prompt_that_shares_nothing_starts_from_an_emptied_cache():
    model = tiny("llama", "int4")
    schedule = plan_of(DecodeSettings(alpha=1.0), 6).schedule
    prefix = PrefixCache(model)
    prefix.keep(*_replied(model, schedule, FIRST))
    cache, reused = prefix.take([7, 8, 9])
    assert reused == 0 and cache.held_by_every_layer() == 0
    again, reused = prefix.take(FIRST)  # nothing was kept after the take
    assert reused == 0 and again is not cache


def _replied(model, schedule, prompt):
    cache = engine.new_cache(model)
    (reply,) = engine.generate(model, _Tokenizer(), [prompt], schedule, max_new_tokens=6, cache=cache)
    return cache, prompt, reply.token_ids


class _Tokenizer:
    """Enough of a tokenizer for the engine: token ids shown as text, no EOS."""

    eos_token_id = None
    pad_token_id = 0

    def decode(self, token_ids, **options):
        return "".join(f"<{token}>" for token in token_ids)
