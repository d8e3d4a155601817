"""A GGUF file's blocks straight into the tiles d3's kernels read, without unpacking a weight.

d3's q4 tiles (quantized.pack_int4_tiles) hold, per tile of R rows and block of 32, byte (j, r, i) with row r's
element 4j + i in its low half and element 16 + 4j + i in its high half: exactly a Q4_0 or Q4_1 block's 16 bytes,
interleaved across the tile's rows. Q8_0's 32 bytes are the q8 tiles' bytes, interleaved (plus 128 where the kernels
want them unsigned). Q5_0/Q5_1 add their fifth bits in a plane behind each block (q5 tiles). The k-quants (Q4_K,
Q5_K, Q6_K) keep their superblocks of 256: each superblock's scale bytes as the file stores them, then its blocks
(q4k, q5k, q6k tiles), with d and dmin as float16 beside them. Every type thus takes the file's bytes per weight
(d3cli/kernels/blocks.h draws the layouts; pack.cpp packs them in one pass).

Q4_0 and Q5_0 keep no offsets (the kernels take w = (q − 8)·d, (q − 16)·d) unless stacked with Q4_1/Q5_1. Without
d3's kernels, Q4_0/Q4_1/Q8_0 can still be packed by numpy (`pack_gguf_numpy`, the reference the kernel is held to
for those types); tests/core/model/test_gguf_tiles.py holds every type's products to its dequantized weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from d3cli import kernels
from d3cli.core.model.gguf_blocks import block_form, dequantized
from d3cli.core.model.quantized import K_QUANT_KINDS, AffineInt4, BlockInt8, tiles_group_size

# GGUF type -> (kernel kind of d3cli/kernels/blocks.h, bytes a block, weights a block)
PACKED_TYPES = {"Q4_0": (4, 18, 32), "Q4_1": (4, 20, 32), "Q5_0": (5, 22, 32), "Q5_1": (5, 24, 32),
                "Q8_0": (8, 34, 32), "Q4_K": (14, 144, 256), "Q5_K": (15, 176, 256), "Q6_K": (16, 210, 256)}
NUMPY_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # what `pack_gguf_numpy` packs
KERNEL_TYPES = {"Q4_0": 0, "Q4_1": 1, "Q4_K": 2, "Q8_0": 3, "Q5_0": 4, "Q5_1": 5, "Q5_K": 6, "Q6_K": 7}  # pack.cpp's
CENTRED_TYPES = ("Q4_0", "Q5_0")  # no offsets stored unless stacked with a type that has them
_BLOCK_BYTES = {4: 16, 5: 20, 8: 32, 14: 16, 15: 20, 16: 24}  # a tile's block of 32, per tile row
_HEADER_BYTES = {14: 12, 15: 12, 16: 16}  # a tile's superblock header, per tile row


def tile_bytes(kernel_kind: int, columns: int, tile_rows: int) -> int:
    """Bytes of one tile of `tile_rows` rows `columns` wide (d3cli/kernels/blocks.h's layouts)."""
    if kernel_kind in K_QUANT_KINDS:
        return columns // 256 * (_HEADER_BYTES[kernel_kind] + 8 * _BLOCK_BYTES[kernel_kind]) * tile_rows
    return columns // 32 * _BLOCK_BYTES[kernel_kind] * tile_rows


@dataclass(frozen=True)
class PackedTiles:
    """One weight in the kernels' tiles: what quantized.TiledWeights holds."""

    kernel_kind: int  # a kind of d3cli/kernels/blocks.h: 4, 5, 8, 14, 15, 16
    tiles: torch.Tensor  # [tiles, bytes per tile] uint8
    scale: torch.Tensor  # [tiles, groups, R] float16 or float32 (k-quants: float16 d per superblock)
    offset: torch.Tensor | None  # like scale (q4/q5 offsets, k-quants' dmin), None (q8, q6k, centred)
    rows: int
    columns: int


def _tiled(rows: np.ndarray, tile_rows: int) -> np.ndarray:
    """[N, ...] padded with zero rows to whole tiles: [tiles, R, ...]."""
    padded = -rows.shape[0] % tile_rows
    if padded:
        rows = np.concatenate([rows, np.zeros((padded, *rows.shape[1:]), dtype=rows.dtype)])
    return rows.reshape(-1, tile_rows, *rows.shape[1:])


def _tile_scales(values: list[np.ndarray], tile_rows: int) -> list[torch.Tensor]:
    """Per-row group values [N, G] as [tiles, G, R]: float16 when float16 holds every one of them, else float32."""
    as_half = all(np.array_equal(value.astype(np.float16).astype(np.float32), value) for value in values)
    dtype = np.float16 if as_half else np.float32
    return [torch.from_numpy(np.ascontiguousarray(_tiled(value.astype(dtype), tile_rows).transpose(0, 2, 1)))
            for value in values]


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0].astype(np.float32)


def pack_gguf(raw: np.ndarray, type_name: str, rows: int, columns: int, tile_rows: int,
              unsigned: bool) -> PackedTiles:
    """A tensor's bytes ([rows, bytes per row]) of a type in PACKED_TYPES as the kernels' tiles: by d3's kernel
    (one pass, d3cli/kernels/pack.cpp) when it is loaded, else by numpy (`pack_gguf_numpy`, NUMPY_TYPES)."""
    if not kernels.loaded():
        return pack_gguf_numpy(raw, type_name, rows, columns, tile_rows, unsigned)
    return pack_joined([GGUFBlocks(raw, type_name, rows, columns)], tile_rows, unsigned)


def pack_gguf_numpy(raw: np.ndarray, type_name: str, rows: int, columns: int, tile_rows: int,
                    unsigned: bool, centred: bool = True) -> PackedTiles:
    """`pack_gguf` in numpy (where d3's kernels are not loaded; the reference the kernel is tested against).
    `centred`: Q4_0 without offsets (the kernels take w = (q − 8)·d), else with offsets −8d like the other
    types."""
    if type_name not in NUMPY_TYPES:
        raise ValueError(f"{type_name} is packed by d3's kernels only")
    kind, block_bytes, _ = PACKED_TYPES[type_name]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, block_bytes)
    if kind == 4:
        start = 2 if type_name == "Q4_0" else 4
        pairs, scale = blocks[..., start:start + 16], _half(blocks, 0)
        offset = None if type_name == "Q4_0" and centred else -8 * scale if type_name == "Q4_0" else _half(blocks, 2)
    else:
        values, scale = blocks[..., 2:34], _half(blocks, 0)
        tiles = _tiled(values.reshape(rows, -1, 8, 4), tile_rows).transpose(0, 2, 3, 1, 4)  # t, b, j, r, i
        if unsigned:  # w + 128, padding rows included (they hold w = 0)
            tiles = (tiles.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return PackedTiles(8, torch.from_numpy(np.ascontiguousarray(tiles).reshape(tiles.shape[0], -1)),
                           *_tile_scales([scale], tile_rows), None, rows, columns)
    tiles = _tiled(pairs.reshape(rows, -1, 4, 4), tile_rows).transpose(0, 2, 3, 1, 4)  # t, b, j, r, i
    scale_tiles, offset_tiles = _tile_scales([scale, offset], tile_rows) if offset is not None else (
        *_tile_scales([scale], tile_rows), None)
    return PackedTiles(4, torch.from_numpy(np.ascontiguousarray(tiles).reshape(tiles.shape[0], -1)), scale_tiles,
                       offset_tiles, rows, columns)


@dataclass(frozen=True)
class GGUFBlocks:
    """A weight's blocks as the file stores them (rows already in the model's order): packed into tiles when the
    kernels run it, else made into its exact form (`exact()`: AffineInt4 or BlockInt8, None for the 5- and 6-bit
    types) or dequantized."""

    raw: np.ndarray  # [rows, bytes per row]
    type_name: str
    rows: int
    columns: int

    @property
    def kernel_kind(self) -> int:
        return PACKED_TYPES[self.type_name][0]

    def exact(self) -> AffineInt4 | BlockInt8 | None:
        return block_form(self.raw, self.type_name, self.rows, self.columns)

    def dequantize(self) -> torch.Tensor:
        exact = self.exact()
        if exact is not None:
            return exact.dequantize()
        return dequantized(self.raw, self.type_name).reshape(self.rows, self.columns)

    def packed(self, tile_rows: int, unsigned: bool) -> PackedTiles:
        return pack_gguf(self.raw, self.type_name, self.rows, self.columns, tile_rows, unsigned)


def joined(parts: list[PackedTiles]) -> PackedTiles:
    """Weights stacked by rows (whole tiles each) as one: their tiles, scales and offsets one after another, the
    scales in float32 when any part's are."""
    if len(parts) == 1:
        return parts[0]
    dtype = torch.float32 if any(part.scale.dtype == torch.float32 for part in parts) else torch.float16
    centre = 16 if parts[0].kernel_kind == 5 else 8
    if all(part.offset is None for part in parts):
        offsets = None
    else:  # a centred Q4_0/Q5_0 part beside parts with offsets: its offsets, −8·scale or −16·scale (exact)
        offsets = torch.cat([(part.offset if part.offset is not None else -centre * part.scale).to(dtype)
                             for part in parts])
    return PackedTiles(parts[0].kernel_kind, torch.cat([part.tiles for part in parts]),
                       torch.cat([part.scale.to(dtype) for part in parts]), offsets,
                       sum(part.rows for part in parts), parts[0].columns)


def pack_joined(parts: list[GGUFBlocks], tile_rows: int, unsigned: bool, allocate=None) -> PackedTiles:
    """Weights stacked by rows (whole tiles each, all of one kernel kind) packed as one: by d3's kernel straight into
    one buffer (no copy to join them), else part by part by numpy and `joined`. `allocate(shape, dtype)` makes the
    buffers the kernel packs into (default: torch.empty; tile_cache.TileCache's are pages of its file)."""
    centred = all(part.type_name in CENTRED_TYPES for part in parts)  # no offsets stored: the file's bytes
    if not kernels.loaded():
        return joined([pack_gguf_numpy(part.raw, part.type_name, part.rows, part.columns, tile_rows, unsigned,
                                       centred) for part in parts])
    kind = parts[0].kernel_kind
    if any(part.kernel_kind != kind for part in parts):
        raise ValueError("stacked weights must share a kernel kind")
    counts = [-(-part.rows // tile_rows) for part in parts]
    columns, total = parts[0].columns, sum(counts)
    allocate = allocate or (lambda shape, dtype: torch.empty(shape, dtype=dtype))
    tiles = allocate((total, tile_bytes(kind, columns, tile_rows)), torch.uint8)
    with_offsets = kind in (14, 15) or kind in (4, 5) and not centred
    # float16 holds every scale and offset a file stores; float32 only if a stack's offsets (−8d) ever did not fit
    for dtype in (torch.float16,) if kind in K_QUANT_KINDS else (torch.float16, torch.float32):
        scale = allocate((total, columns // tiles_group_size(kind), tile_rows), dtype)
        offset = allocate(tuple(scale.shape), dtype) if with_offsets else torch.empty(0, dtype=dtype)
        exact, start = True, 0
        for part, count in zip(parts, counts):
            source = torch.from_numpy(np.ascontiguousarray(part.raw)).reshape(part.rows, -1)
            exact &= torch.ops.d3.pack_gguf_into(source, KERNEL_TYPES[part.type_name], tile_rows, unsigned,
                                                 tiles[start:start + count], scale[start:start + count],
                                                 offset[start:start + count] if offset.numel() else offset)
            start += count
            if not exact:
                break
        if exact:
            break
    return PackedTiles(kind, tiles, scale, offset if offset.numel() else None, sum(part.rows for part in parts),
                       columns)
