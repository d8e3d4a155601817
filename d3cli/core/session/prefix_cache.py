"""A reply's KV cache kept for the next prompt that begins with the same tokens: a server's prompt cache (as
llama.cpp's server keeps its slot's prompt, and vLLM's prefix caching), a chat's earlier turns.

D3 prefills every prompt at full depth, and a layer that a reply's token skips never runs again in that reply, so
after a reply the positions that every layer holds were all computed at full depth: the prompt and the reply's first
tokens. The next prompt that starts with the same tokens crops the cache to the longest such prefix and prefills only
what follows. On d3's kernels its logits are bit-identical to a fresh prefill of the whole prompt
(tests/core/session/test_prefix_cache.py); on torch's own path they may differ in the last bits, as a chat's turns
already do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from d3cli.core.decode.engine import new_cache


def common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def reusable_length(cache, cached_ids: Sequence[int], token_ids: Sequence[int]) -> int:
    """How many leading positions of `token_ids` `cache` (whose positions hold `cached_ids`) can give: the prefix
    they share that every layer holds, leaving at least one token to prefill (it makes the first logits)."""
    if cache is None:
        return 0
    return max(0, min(common_prefix_length(token_ids, cached_ids), cache.held_by_every_layer(), len(token_ids) - 1))


@dataclass
class PrefixCache:
    """The cache of the last single-prompt reply of `model` and the tokens at its positions."""

    model: object
    cache: object | None = None
    cached_ids: list[int] = field(default_factory=list)

    def reusable_length(self, token_ids: Sequence[int]) -> int:
        """How many leading positions of `token_ids` the kept cache can give (module function of the same name)."""
        return reusable_length(self.cache, self.cached_ids, token_ids)

    def take(self, token_ids: Sequence[int]) -> tuple[object, int]:
        """A cache to decode `token_ids` with and how many of its leading positions it already holds: the kept
        cache cropped to the shared prefix, or a fresh one. Nothing is kept until `keep` (a reply that fails leaves
        no cache behind)."""
        cache, reused = self.cache, self.reusable_length(token_ids)
        self.forget()
        if cache is None or not cache.crop_to(reused):
            return new_cache(self.model), 0
        return cache, reused

    def keep(self, cache, token_ids: Sequence[int], reply_token_ids: Sequence[int]) -> None:
        """Keep `cache` after a reply of `reply_token_ids` to the prompt `token_ids` (every generated token but the
        last was fed back through the layers that ran)."""
        self.cache, self.cached_ids = cache, [*token_ids, *reply_token_ids[:-1]]

    def forget(self) -> None:
        self.cache, self.cached_ids = None, []
