"""Samplers: the settings' checks (exact words), greedy as argmax, and sampled tokens that follow the temperature,
top-k and top-p distributions, reproducible under a seed."""

from __future__ import annotations

import math

import pytest
import torch

from d3cli.base.errors import UserError
from d3cli.core.decode.sampling import SamplingSettings, greedy, make_sampler

PROBABILITIES = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
ROWS = 40_000  # draws at once: one row each, so a distribution is one call


def draws(settings: SamplingSettings, probabilities: torch.Tensor = PROBABILITIES) -> torch.Tensor:
    """How often each token came up in ROWS draws from logits whose softmax is `probabilities`, as fractions."""
    logits = probabilities.log().float().expand(ROWS, -1).contiguous()
    tokens = make_sampler(settings)(logits)
    assert tokens.shape == (ROWS,)
    return torch.bincount(tokens, minlength=len(probabilities)).double() / ROWS


@pytest.mark.parametrize("fields, message", [
    (dict(temperature=-0.5), "temperature must be >= 0, not -0.5"),
    (dict(temperature=math.nan), "temperature must be >= 0, not nan"),
    (dict(temperature=True), "temperature must be >= 0, not True"),
    (dict(temperature=1, top_k=-1), "top-k must be a whole number >= 0 (0 = off), not -1"),
    (dict(temperature=1, top_k=2.5), "top-k must be a whole number >= 0 (0 = off), not 2.5"),
    (dict(temperature=1, top_p=0), "top-p must lie in (0, 1], not 0"),
    (dict(temperature=1, top_p=1.01), "top-p must lie in (0, 1], not 1.01"),
    (dict(temperature=1, seed=2**64), f"seed must fit in 64 bits, not {2**64}"),
    (dict(temperature=1, seed=-2**63 - 1), f"seed must fit in 64 bits, not {-2**63 - 1}"),
    (dict(temperature=1, seed="7"), "seed must be a whole number, not '7'"),
    (dict(top_k=5), "--top-k and --top-p only apply when sampling: add --temperature above 0"),
    (dict(top_p=0.9), "--top-k and --top-p only apply when sampling: add --temperature above 0"),
])
def test_bad_settings_are_user_errors_in_the_options_words(fields, message):
    with pytest.raises(UserError) as caught:
        SamplingSettings(**fields)
    assert str(caught.value) == message


def test_the_edges_of_each_range_are_accepted():
    assert SamplingSettings().greedy and not SamplingSettings(temperature=1e-300).greedy
    for seed in (0, 2**64 - 1, -2**63, None):
        assert SamplingSettings(temperature=1, top_k=0, top_p=1, seed=seed).seed == seed


def test_greedy_settings_make_the_argmax_sampler():
    assert make_sampler(SamplingSettings()) is greedy
    logits = torch.randn(5, 49152, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy(logits), logits.argmax(dim=-1))  # d3's kernel where it is loaded
    assert torch.equal(greedy(logits.double()), logits.argmax(dim=-1))  # torch's elsewhere
    assert greedy(logits[0]).item() == logits[0].argmax().item()


def test_temperature_one_samples_the_softmax_and_a_lower_one_sharpens_it():
    assert torch.allclose(draws(SamplingSettings(temperature=1.0, seed=1)), PROBABILITIES, atol=0.01)
    sharpened = PROBABILITIES**2 / (PROBABILITIES**2).sum()  # softmax(log p / 0.5)
    assert torch.allclose(draws(SamplingSettings(temperature=0.5, seed=1)), sharpened, atol=0.01)
    flattened = PROBABILITIES**0.5 / (PROBABILITIES**0.5).sum()
    assert torch.allclose(draws(SamplingSettings(temperature=2.0, seed=1)), flattened, atol=0.01)


def test_top_k_keeps_the_k_best_tokens_in_their_proportions():
    assert draws(SamplingSettings(temperature=1.0, top_k=1, seed=2)).tolist() == [1.0, 0.0, 0.0, 0.0]
    two = draws(SamplingSettings(temperature=1.0, top_k=2, seed=2))
    assert two[2:].tolist() == [0.0, 0.0] and two[0].item() == pytest.approx(0.5 / 0.8, abs=0.01)
    assert draws(SamplingSettings(temperature=1.0, top_k=100, seed=2))[3].item() > 0  # k above the vocabulary


@pytest.mark.parametrize("top_p, kept", [(0.4, 1), (0.6, 2), (0.9, 3), (0.99, 4)])
def test_top_p_keeps_the_fewest_best_tokens_that_reach_it(top_p, kept):
    """Cumulative probabilities 0.5, 0.8, 0.95, 1: a token stays while those ranked above it hold less than top_p."""
    frequencies = draws(SamplingSettings(temperature=1.0, top_p=top_p, seed=3))
    assert (frequencies > 0).tolist() == [True] * kept + [False] * (4 - kept)
    expected = PROBABILITIES[:kept] / PROBABILITIES[:kept].sum()
    assert torch.allclose(frequencies[:kept], expected, atol=0.01)


def test_a_seed_reproduces_a_whole_stream_of_draws_and_another_seed_does_not():
    logits = torch.zeros(8, 1000)

    def stream(seed):
        sampler = make_sampler(SamplingSettings(temperature=1.0, seed=seed))
        return [sampler(logits).tolist() for _ in range(4)]

    first = stream(7)
    assert first == stream(7)
    assert first != stream(8)
    assert first[0] != first[1]  # seeded once, not once per call
    unseeded = make_sampler(SamplingSettings(temperature=1.0))
    assert unseeded(logits).tolist() != make_sampler(SamplingSettings(temperature=1.0))(logits).tolist()


def test_a_tiny_temperature_samples_the_greedy_token_instead_of_failing():
    """logits / 1e-300 overflows to inf and the softmax to NaN: the sampler must divide after subtracting the best."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]]) * 40
    for temperature in (1e-300, 1e-30, 1e-6):
        sampler = make_sampler(SamplingSettings(temperature=temperature, top_k=2, top_p=0.9, seed=0))
        assert sampler(logits).tolist() == [1, 0]
