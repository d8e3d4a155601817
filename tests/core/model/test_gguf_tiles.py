"""A GGUF file's blocks packed straight into d3's tiles: for every type d3 runs as stored, the kernels' products are
the file's dequantized weights times the quantized activations, from tiles of no more bytes than the file's; the
4-bit and Q8_0 tiles also against the long way round (exact form, then quantized.pack_*_tiles) to the byte, in both
tile layouts the kernels use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants
from gguf_files import tensor_bytes

from d3cli import kernels
from d3cli.core.model.gguf_tiles import (
    NUMPY_TYPES,
    PACKED_TYPES,
    GGUFBlocks,
    joined,
    pack_gguf,
    pack_gguf_numpy,
    pack_joined,
)
from d3cli.core.model.quantized import AffineInt4, exact_scales, pack_int4_tiles, pack_int8_tiles, pack_tile_scales


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x quantized as the kernels quantize it (per block of 32: d·q, d = max|x| / 127, q rounded) times weightᵀ."""
    blocks = x.reshape(x.shape[0], -1, 32)
    largest = blocks.abs().amax(-1, keepdim=True)
    q = torch.round(blocks * torch.where(largest > 0, torch.tensor(127.0) / largest, torch.zeros_like(largest)))
    return (q * (largest / 127)).reshape(x.shape).double() @ weight.double().T


def long_way(form, tile_rows: int, unsigned: bool):
    if isinstance(form, AffineInt4):
        scale, offset = exact_scales(form.scale, form.offset)
        return pack_int4_tiles(form.q, tile_rows), pack_tile_scales(scale, tile_rows), pack_tile_scales(
            offset, tile_rows)
    (scale,) = exact_scales(form.scale)
    return pack_int8_tiles(form.q, tile_rows, unsigned), pack_tile_scales(scale, tile_rows), None


@pytest.mark.parametrize("layout", [(8, False), (16, True)])
@pytest.mark.parametrize("type_name", NUMPY_TYPES)
def test_packing_the_files_blocks_gives_the_tiles_of_their_exact_form(type_name, layout):
    tile_rows, unsigned = layout
    rows, columns = 20, 512  # a last tile part padding
    raw, _ = tensor_bytes((rows, columns), 0.05, type_name, np.random.default_rng(3))
    blocks = GGUFBlocks(np.asarray(raw).view(np.uint8).reshape(rows, -1), type_name, rows, columns)
    packed = blocks.packed(tile_rows, unsigned)
    tiles, scale, offset = long_way(blocks.exact(), tile_rows, unsigned)
    assert packed.tiles.dtype == torch.uint8 and torch.equal(packed.tiles, tiles)
    assert packed.scale.dtype == scale.dtype and torch.equal(packed.scale, scale)
    if type_name == "Q4_0":  # centred: no offsets kept, the kernels take w = (q − 8)·d, what −8d offsets say
        assert packed.offset is None and torch.equal(offset, -8 * scale)
    else:
        assert (packed.offset is None) == (offset is None)
    if offset is not None and packed.offset is not None:
        assert packed.offset.dtype == offset.dtype and torch.equal(packed.offset, offset)
    assert packed.scale.dtype == torch.float16  # the file's own float16 scales


def test_stacked_weights_join_tile_by_tile_a_centred_part_given_its_offsets():
    rng = np.random.default_rng(4)
    parts = []
    for type_name in ("Q4_0", "Q4_1"):
        raw, _ = tensor_bytes((16, 256), 0.05, type_name, rng)
        parts.append(GGUFBlocks(np.asarray(raw).view(np.uint8).reshape(16, -1), type_name, 16, 256))
    packed = [pack_gguf_numpy(part.raw, part.type_name, 16, 256, 16, True) for part in parts]
    assert packed[0].offset is None and packed[1].offset is not None
    both = joined(packed)
    assert both.rows == 32 and both.scale.dtype == torch.float16
    assert torch.equal(both.tiles, torch.cat([part.tiles for part in packed]))
    assert torch.equal(both.offset[:1], -8 * packed[0].scale) and torch.equal(both.offset[1:], packed[1].offset)


@pytest.mark.skipif(not kernels.available(), reason="d3's kernels cannot be built here")
@pytest.mark.parametrize("layout", [(8, False), (16, True)])
@pytest.mark.parametrize("type_name", NUMPY_TYPES)
def test_the_packing_kernel_gives_numpys_bytes(type_name, layout):
    rows, columns = 37, 96 * 8
    raw, _ = tensor_bytes((rows, columns), 0.05, type_name, np.random.default_rng(5))
    raw = np.asarray(raw).view(np.uint8).reshape(rows, -1)
    mine, reference = pack_gguf(raw, type_name, rows, columns, *layout), pack_gguf_numpy(raw, type_name, rows,
                                                                                        columns, *layout)
    assert torch.equal(mine.tiles, reference.tiles)
    assert mine.scale.dtype == reference.scale.dtype and torch.equal(mine.scale, reference.scale)
    assert (mine.offset is None) == (reference.offset is None)
    if mine.offset is not None:
        assert mine.offset.dtype == reference.offset.dtype and torch.equal(mine.offset, reference.offset)


@pytest.mark.skipif(not kernels.available(), reason="d3's kernels cannot be built here")
@pytest.mark.parametrize("types", [("Q4_0", "Q4_1"), ("Q8_0", "Q8_0"), ("Q4_0", "Q4_0"), ("Q5_0", "Q5_1"),
                                   ("Q5_0", "Q5_0"), ("Q4_K", "Q4_K"), ("Q5_K", "Q5_K"), ("Q6_K", "Q6_K")])
def test_parts_packed_into_one_buffer_equal_parts_packed_and_joined(types):
    rng = np.random.default_rng(6)
    parts = []
    for rows, type_name in zip((32, 20), types):
        raw, _ = tensor_bytes((rows, 512), 0.05, type_name, rng)
        parts.append(GGUFBlocks(np.asarray(raw).view(np.uint8).reshape(rows, -1), type_name, rows, 512))
    tile_rows, unsigned = kernels.layout()  # the kernels' own layout: the product below runs on them
    together = pack_joined(parts, tile_rows, unsigned)
    centred = all(part.type_name in ("Q4_0", "Q5_0") for part in parts)
    if all(type_name in NUMPY_TYPES for type_name in types):
        apart = joined([pack_gguf_numpy(part.raw, part.type_name, part.rows, 512, tile_rows, unsigned, centred)
                        for part in parts])
    else:
        apart = joined([pack_joined([part], tile_rows, unsigned) for part in parts])
    assert torch.equal(together.tiles, apart.tiles) and together.rows == 52
    assert together.scale.dtype == apart.scale.dtype and torch.equal(together.scale, apart.scale)
    assert (together.offset is None) == (apart.offset is None) == (
        centred or types[0] in ("Q8_0", "Q6_K"))
    if apart.offset is not None:
        assert torch.equal(together.offset, apart.offset)
    x = torch.randn(2, 512)
    stacked = torch.ops.d3.tiled_linear(x, together.kernel_kind, together.tiles, together.scale, together.offset,
                                        512 // together.scale.shape[1], 52)
    reference = torch.cat([x @ part.dequantize().T for part in parts], dim=1)
    assert (stacked - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.skipif(not kernels.available(), reason="d3's kernels cannot be built here")
@pytest.mark.parametrize("rows", [48, 37])  # whole tiles and a padded one
@pytest.mark.parametrize("type_name", sorted(PACKED_TYPES))
def test_every_type_runs_as_stored_its_products_those_of_its_dequantized_weights(type_name, rows):
    """The kernels' product of a type's tiles is the gguf package's dequantized weights times the activations as the
    kernels quantize them (per block of 32 to int8), to float rounding, for every row of a batch; and the tiles
    take the file's bytes (a padded last tile aside)."""
    from d3cli.core.model.quantized import tensor_bytes as stored_bytes

    columns = 1024
    raw, qtype = tensor_bytes((rows, columns), 0.05, type_name, np.random.default_rng(11))
    raw = np.asarray(raw).view(np.uint8).reshape(rows, -1)
    blocks = GGUFBlocks(raw, type_name, rows, columns)
    tile_rows, unsigned = kernels.layout()
    packed = blocks.packed(tile_rows, unsigned)
    assert packed.kernel_kind == PACKED_TYPES[type_name][0]
    whole_rows = -(-rows // tile_rows) * tile_rows
    assert stored_bytes(packed.tiles, packed.scale, packed.offset) == raw.nbytes // rows * whole_rows
    dequantized = torch.from_numpy(quants.dequantize(raw, qtype)).float()
    assert torch.equal(blocks.dequantize(), dequantized)
    x = torch.randn(5, columns)
    out = torch.ops.d3.tiled_linear(x, packed.kernel_kind, packed.tiles, packed.scale, packed.offset,
                                    columns // packed.scale.shape[1], rows)
    expected = reference(x, dequantized)
    assert (out.double() - expected).abs().max() <= 2e-6 * expected.abs().max()
    alone = torch.ops.d3.tiled_linear(x[3:4], packed.kernel_kind, packed.tiles, packed.scale, packed.offset,
                                      columns // packed.scale.shape[1], rows)
    assert torch.equal(alone, out[3:4])  # a row computed alone equals the same row in a batch


@pytest.mark.skipif(not kernels.available(), reason="d3's kernels cannot be built here")
def test_q6_k_dequantized_by_the_kernel_equals_the_gguf_package_to_the_bit():
    from gguf import GGMLQuantizationType, quants

    from d3cli.core.model.gguf_blocks import dequantized

    raw, _ = tensor_bytes((9, 512), 0.05, "Q6_K", np.random.default_rng(7))
    raw = np.asarray(raw).view(np.uint8).reshape(9, -1)
    mine = dequantized(raw, "Q6_K")
    assert torch.equal(mine, torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q6_K)))


@pytest.mark.skipif(not kernels.available(), reason="d3's kernels cannot be built here")
def test_centred_q4_0_tiles_compute_what_the_same_tiles_with_offsets_compute():
    """Q4_0 packed without offsets (w = (q − 8)·d in the kernel, an exact integer correction) against the same tiles
    with their −8d offsets: the same products to float rounding, for every row of a batch."""
    raw, _ = tensor_bytes((40, 512), 0.05, "Q4_0", np.random.default_rng(8))
    raw = np.asarray(raw).view(np.uint8).reshape(40, -1)
    tile_rows, unsigned = kernels.layout()
    centred = pack_gguf(raw, "Q4_0", 40, 512, tile_rows, unsigned)
    offsets = pack_gguf_numpy(raw, "Q4_0", 40, 512, tile_rows, unsigned, centred=False)
    assert centred.offset is None and torch.equal(centred.tiles, offsets.tiles)
    x = torch.randn(3, 512)
    with_offsets = torch.ops.d3.q4_linear(x, offsets.tiles, offsets.scale, offsets.offset, 32, 40)
    without = torch.ops.d3.q4_linear(x, centred.tiles, centred.scale, None, 32, 40)
    assert torch.allclose(without, with_offsets, rtol=1e-5, atol=1e-5 * float(with_offsets.abs().max()))
    reference = x @ GGUFBlocks(raw, "Q4_0", 40, 512).dequantize().T  # and near the float product
    assert (without - reference).abs().max() < 0.02 * reference.abs().max()
