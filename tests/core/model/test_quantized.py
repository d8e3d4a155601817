"""Quantized linear layers on torch's kernels against the float products of their own dequantized weights, and the
quantization of float weights. (On d3's kernels, whose activations are int8, in tests/kernels/.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from d3cli import kernels
from d3cli.core.model.quantized import (
    AffineInt4,
    BlockInt8,
    BlockInt8Linear,
    Int4Linear,
    Int8Linear,
    quantize_int4,
    quantize_int8,
)


@pytest.fixture(autouse=True)
def torch_kernels():
    """Every layer built in these tests runs on torch's kernels."""
    with kernels.turned_off():
        yield


def random_int4(rows: int, columns: int, group: int = 32, seed: int = 0) -> AffineInt4:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, columns), dtype=torch.uint8, generator=generator)
    scale = torch.rand(rows, columns // group, generator=generator) / 10
    offset = torch.randn(rows, columns // group, generator=generator) / 5
    return AffineInt4(q, scale, offset)


def test_nibbles_round_trip():
    form = random_int4(16, 64)
    nibbles = form.nibbles()
    assert nibbles.shape == (16, 32) and nibbles.dtype == torch.uint8
    again = AffineInt4.from_nibbles(nibbles, form.scale, form.offset)
    assert torch.equal(again.q, form.q) and torch.equal(again.dequantize(), form.dequantize())


@pytest.mark.parametrize("rows", [16, 48, 40, 7])  # 40 and 7: padded to the kernel's multiple of 16
@pytest.mark.parametrize("group", [32, 64])
def test_int4_linear_computes_its_dequantized_product(rows, group):
    form = random_int4(rows, 128, group, seed=rows)
    bias = torch.randn(rows)
    layer = Int4Linear(form, bias, torch.float32)
    hidden = torch.randn(2, 5, 128)
    expected = hidden @ form.dequantize().T + bias
    assert layer(hidden).shape == (2, 5, rows)
    torch.testing.assert_close(layer(hidden), expected, rtol=1e-5, atol=1e-5)
    if rows % 16 == 0:  # (padded rows take room too)
        assert layer.weight_bytes() < rows * 128 * 4 / 4  # a quarter of float32 or less, scales included


def test_int4_linear_in_bfloat16_stays_close():
    form = random_int4(64, 256)
    hidden = torch.randn(3, 256)
    expected = hidden @ form.dequantize().T
    out = Int4Linear(form, None, torch.bfloat16)(hidden.bfloat16())
    assert out.dtype == torch.bfloat16
    assert ((out.float() - expected).abs().max() / expected.abs().max()) < 2e-2


def test_int8_linear_computes_its_dequantized_product():
    weight = torch.randn(24, 64)
    q, scale = quantize_int8(weight)
    layer = Int8Linear(q, scale, None, torch.float32)
    hidden = torch.randn(4, 64)
    torch.testing.assert_close(layer(hidden), hidden @ (q.float() * scale[:, None]).T, rtol=1e-5, atol=1e-5)
    assert (q.float() * scale[:, None] - weight).abs().max() <= scale.max() / 2 + 1e-7


def test_quantize_int4_is_within_half_a_step_and_exact_for_flat_groups():
    weight = torch.randn(16, 64)
    weight[3, :32] = 0.25  # a group of equal values
    form = quantize_int4(weight)
    error = (form.dequantize() - weight).abs().reshape(16, 2, 32)
    assert bool((error <= form.scale[..., None] / 2 + 1e-6).all())
    assert torch.equal(form.dequantize()[3, :32], weight[3, :32])


def test_int4_linear_matches_a_float_linear_quantized_on_load():
    linear = nn.Linear(64, 32)
    form = quantize_int4(linear.weight)
    layer = Int4Linear(form, linear.bias, torch.float32)
    hidden = torch.randn(5, 64)
    torch.testing.assert_close(layer(hidden), nn.functional.linear(hidden, form.dequantize(), linear.bias),
                               rtol=1e-5, atol=1e-5)


def test_q8_0_blocks_run_exactly_as_two_int4_halves():
    generator = torch.Generator().manual_seed(2)
    table = BlockInt8(torch.randint(-128, 128, (40, 96), dtype=torch.int8, generator=generator),
                      torch.rand(40, 3, generator=generator) / 50)
    bias = torch.randn(40)
    layer = BlockInt8Linear(table, bias, torch.float32)
    hidden = torch.randn(2, 3, 96)
    torch.testing.assert_close(layer(hidden), hidden @ table.dequantize().T + bias, rtol=1e-5, atol=1e-5)


def test_every_quantized_linear_layer_shares_one_base():
    """One forward for all of them: the tiles on d3's kernels, else the class's own product on torch's."""
    from d3cli.core.model.quantized import BlockInt8Linear, Int4Linear, Int8Linear, QuantizedLinear, StoredLinear

    assert all(issubclass(cls, QuantizedLinear) for cls in (Int4Linear, StoredLinear, Int8Linear, BlockInt8Linear))
    assert all("forward" not in vars(cls) for cls in (Int4Linear, StoredLinear, Int8Linear, BlockInt8Linear))
