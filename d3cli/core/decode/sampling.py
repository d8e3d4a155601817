"""Samplers: functions from a batch of next-token logits to a batch of token ids. The engine only calls them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from d3cli.base.errors import UserError

if TYPE_CHECKING:  # torch is imported where a sampler is made, so the CLI can validate options without it
    import torch

Sampler = Callable[["torch.Tensor"], "torch.Tensor"]


def check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or math.isnan(temperature) \
            or temperature < 0:
        raise UserError(f"temperature must be >= 0, not {temperature}")


def check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise UserError(f"top-k must be a whole number >= 0 (0 = off), not {top_k}")


def check_top_p(top_p: float) -> None:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise UserError(f"top-p must lie in (0, 1], not {top_p}")


def check_seed(seed: int | None) -> None:
    """torch's generators take seeds that fit in 64 bits."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed must be a whole number, not {seed!r}")
    if not -2**63 <= seed < 2**64:
        raise UserError(f"seed must fit in 64 bits, not {seed}")


@dataclass(frozen=True)
class SamplingSettings:
    """Greedy when temperature is 0; otherwise temperature, then top-k, then top-p (nucleus), seeded if asked."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        check_top_k(self.top_k)
        check_top_p(self.top_p)
        check_seed(self.seed)
        if self.temperature == 0 and (self.top_k or self.top_p < 1.0):
            raise UserError("--top-k and --top-p only apply when sampling: add --temperature above 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The best token of each row: torch.argmax's choice (d3's kernel computes it faster on the CPU, once loaded)."""
    from d3cli import kernels

    if logits.dim() == 2 and logits.device.type == "cpu" and logits.dtype == logits.new_empty(0).float().dtype \
            and kernels.loaded():
        import torch

        return torch.ops.d3.argmax(logits)
    return logits.argmax(dim=-1)


def make_sampler(settings: SamplingSettings, device: torch.device | str = "cpu") -> Sampler:
    """A sampler for `settings`; its random stream is seeded once, so a seed reproduces a whole reply."""
    if settings.greedy:
        return greedy
    import torch

    generator = torch.Generator(device=device)
    if settings.seed is None:
        generator.seed()
    else:
        generator.manual_seed(settings.seed)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        # in float64 (a temperature like 1e-300 is 0 in float32), with the best score first made 0: a tiny temperature
        # then sends the others to -inf and keeps the best at 0 (dividing first made inf - inf = NaN)
        scores = logits.double()
        scores = (scores - scores.amax(dim=-1, keepdim=True)) / settings.temperature
        if settings.top_k:
            kth_best = torch.topk(scores, min(settings.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth_best, float("-inf"))
        if settings.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
            # Drop a token when the tokens ranked above it already reach top_p; the best token always stays.
            drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= settings.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        probabilities = torch.softmax(scores, dim=-1)
        return torch.multinomial(probabilities, num_samples=1, generator=generator).squeeze(-1)

    return sample
