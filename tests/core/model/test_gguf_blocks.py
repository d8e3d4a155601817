"""GGUF blocks decoded by d3 against the gguf package's own dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from d3cli.core.model.gguf_blocks import block_form, dequantized, nearest_kind, same_values
from d3cli.core.model.quantized import AffineInt4, BlockInt8


def byte_rows(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    return quants.quantize(values, qtype)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_quantized_blocks_decode_to_the_gguf_packages_values(name):
    qtype = GGMLQuantizationType[name]
    values = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    raw = byte_rows(values, qtype)
    form = block_form(raw, name, 6, 128)
    assert isinstance(form, BlockInt8 if name == "Q8_0" else AffineInt4)
    reference = torch.from_numpy(quants.dequantize(raw, qtype).reshape(6, 128))
    assert same_values(form.dequantize(), reference)
    if name == "Q4_1":  # q·d + m computed as the gguf package computes it: equal to the bit
        assert torch.equal(form.dequantize(), reference)


def random_q4_k(rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """Q4_K rows of random blocks: random nibbles and 6-bit scales, small float16 d and dmin."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * columns // 256, 144), dtype=np.uint8)
    for start in (0, 2):  # d and dmin
        halves = rng.uniform(0.001, 0.01, size=blocks.shape[0]).astype(np.float16)
        blocks[:, start:start + 2] = halves.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, columns // 256 * 144)


def test_q4_k_blocks_decode_to_the_gguf_packages_values():
    raw = random_q4_k(4, 512)
    form = block_form(raw, "Q4_K", 4, 512)
    assert isinstance(form, AffineInt4) and form.group_size == 32
    reference = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q4_K).reshape(4, 512))
    assert torch.equal(form.dequantize(), reference)


def test_types_without_an_exact_form_have_none_and_a_nearest_kind():
    assert block_form(np.zeros((2, 210), np.uint8), "Q6_K", 2, 256) is None
    assert [nearest_kind(name) for name in ("Q4_0", "Q4_K", "Q8_0", "Q6_K", "Q5_K", "Q3_K", "IQ4_XS", "F16")] == [
        "int4", "int4", "int8", "int6", "int5", "int4", "int4", "float"]


def test_a_wrong_row_order_is_not_the_same_values():
    values = torch.randn(8, 64)
    assert same_values(values, values.clone())
    assert not same_values(values[[1, 0, *range(2, 8)]], values)
    assert not same_values(values[:4], values)


@pytest.mark.parametrize("type_name, dtype", [("F32", np.float32), ("F16", np.float16)])
def test_float_tensors_read_as_the_gguf_package_reads_them(type_name, dtype):
    values = np.random.default_rng(0).standard_normal((3, 64)).astype(dtype)
    raw = values.view(np.uint8).reshape(3, -1)
    theirs = quants.dequantize(raw, GGMLQuantizationType[type_name])
    assert torch.equal(dequantized(raw, type_name), torch.from_numpy(np.asarray(theirs, dtype=np.float32)))
