"""The per-position perplexity profile: NLL by position after the prompt, in buckets with confidence intervals, and
a fitted power-law decay ppl(i) ≈ c + a·(i+1)^(−b). Pure Python, no torch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

Z_95 = 1.959963984540054


@dataclass(frozen=True)
class Bucket:
    """Positions first..last together: mean NLL, perplexity, and a 95% confidence interval of both."""

    first: int
    last: int
    count: int
    mean_nll: float
    nll_low: float
    nll_high: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    def as_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity, "perplexity_low": math.exp(self.nll_low),
                "perplexity_high": math.exp(self.nll_high)}


def buckets(nll_per_text: Sequence[Sequence[float]], bucket_size: int,
            max_positions: int | None = None) -> list[Bucket]:
    """Positions grouped `bucket_size` at a time; the interval is mean ± 1.96 standard errors (a point when n = 1)."""
    if bucket_size < 1:
        raise ValueError("bucket_size must be at least 1")
    longest = max((len(values) for values in nll_per_text), default=0)
    if max_positions is not None:
        longest = min(longest, max_positions)
    result = []
    for first in range(0, longest, bucket_size):
        last = min(first + bucket_size, longest) - 1
        values = [value for text in nll_per_text for value in text[first:last + 1]]
        mean = _mean(values)
        half = Z_95 * _std(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        result.append(Bucket(first, last, len(values), mean, mean - half, mean + half))
    return result


@dataclass(frozen=True)
class PowerLawFit:
    """ppl(i) ≈ c + a·(i+1)^(−b), by weighted least squares; r2 is the weighted coefficient of determination."""

    a: float
    b: float
    c: float
    r2: float
    rmse: float
    points: int

    def predict(self, position: int) -> float:
        return self.c + self.a * (position + 1) ** (-self.b)

    def as_dict(self) -> dict:
        return asdict(self)


def fit_power_law(positions: Sequence[int], values: Sequence[float], weights: Sequence[float] | None = None,
                  b_max: float = 5.0) -> PowerLawFit:
    """Fit value ≈ c + a·(position+1)^(−b). For a fixed b the model is linear in (c, a), solved exactly; b is found
    by a log-spaced scan followed by golden-section refinement. Needs at least three distinct positions."""
    if len(positions) != len(values):
        raise ValueError("positions and values differ in length")
    weights = [1.0] * len(values) if weights is None else list(weights)
    if len(set(positions)) < 3:
        raise ValueError("a power-law fit needs at least three distinct positions")

    def solve(b: float) -> tuple[float, float, float]:
        xs = [(position + 1) ** (-b) for position in positions]
        total = sum(weights)
        mean_x = sum(w * x for w, x in zip(weights, xs)) / total
        mean_y = sum(w * y for w, y in zip(weights, values)) / total
        sxx = sum(w * (x - mean_x) ** 2 for w, x in zip(weights, xs))
        sxy = sum(w * (x - mean_x) * (y - mean_y) for w, x, y in zip(weights, xs, values))
        a = sxy / sxx if sxx > 0 else 0.0
        c = mean_y - a * mean_x
        sse = sum(w * (y - c - a * x) ** 2 for w, x, y in zip(weights, xs, values))
        return sse, a, c

    grid = [b_max * 10 ** (-3 + 3 * step / 60) for step in range(61)]  # 0.005 .. b_max, log-spaced
    best = min(range(len(grid)), key=lambda index: solve(grid[index])[0])
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        left, right = high - ratio * (high - low), low + ratio * (high - low)
        if solve(left)[0] <= solve(right)[0]:
            high = right
        else:
            low = left
    b = (low + high) / 2
    sse, a, c = solve(b)
    total = sum(weights)
    mean_y = sum(w * y for w, y in zip(weights, values)) / total
    sst = sum(w * (y - mean_y) ** 2 for w, y in zip(weights, values))
    r2 = 1.0 - sse / sst if sst > 0 else 1.0
    return PowerLawFit(a=a, b=b, c=c, r2=r2, rmse=math.sqrt(sse / total), points=len(values))


def fit_profile(nll_per_text: Sequence[Sequence[float]], max_positions: int | None = None,
                min_count: int = 2) -> PowerLawFit | None:
    """The power law through each position's perplexity, weighted by how many tokens it averages; None when fewer
    than three positions have `min_count` tokens."""
    usable = [bucket for bucket in buckets(nll_per_text, 1, max_positions) if bucket.count >= min_count]
    if len(usable) < 3:
        return None
    return fit_power_law([bucket.first for bucket in usable], [bucket.perplexity for bucket in usable],
                         [bucket.count for bucket in usable])


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))
