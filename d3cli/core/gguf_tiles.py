"""A GGUF file's 4- and 8-bit blocks straight into the tiles d3's kernels read, without unpacking a weight.

d3's q4 tiles (quantized.pack_int4_tiles) hold, per tile of R rows and block of 32, byte (j, r, i) with row r's
element 4j + i in its low half and element 16 + 4j + i in its high half: exactly a Q4_0 or Q4_1 block's 16 bytes,
interleaved across the tile's rows. A Q4_K block's bytes pair its nibbles the other way (element l and 32 + l of 64),
so they are re-paired with four bit operations. Q8_0's 32 bytes are the q8 tiles' bytes, interleaved (plus 128 where
the kernels want them unsigned). Q4_0 keeps no offsets (the kernels take w = (q − 8)·d: 4.5 bits a weight, as the
file) unless it is stacked with another 4-bit type. Scales and offsets are those `AffineInt4`/`BlockInt8` hold, in float16 where that
is exact (`quantized.exact_scales`'s rule). So a weight goes from the file to the kernels in one copy, instead of
one byte per weight and back (tests/core/test_gguf_tiles.py holds both ways to the same bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from d3cli.core.quantized import AffineInt4, BlockInt8

PACKED_TYPES = {"Q4_0": (4, 18), "Q4_1": (4, 20), "Q4_K": (4, 144), "Q8_0": (8, 34)}  # kernel kind, block bytes


@dataclass(frozen=True)
class PackedTiles:
    """One weight in the kernels' tiles: what quantized.TiledWeights holds."""

    kernel_kind: int  # 4 or 8
    tiles: torch.Tensor  # [tiles, bytes per tile] uint8
    scale: torch.Tensor  # [tiles, groups, R] float16 or float32
    offset: torch.Tensor | None  # like scale (q4), None (q8)
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


def _q4k_pairs(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K blocks [N, S, 144] → (bytes [N, S·8, 16] paired as d3's tiles pair them, scale, offset [N, S·8])."""
    from gguf.quants import Q4_K

    rows, supers = blocks.shape[:2]
    d, dmin = _half(blocks, 0)[..., None], _half(blocks, 2)[..., None]
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))
    scale = (d * sc.reshape(rows, supers, 8).astype(np.float32)).reshape(rows, -1)
    offset = -(dmin * m.reshape(rows, supers, 8).astype(np.float32)).reshape(rows, -1)
    chunks = blocks[..., 16:144].reshape(rows, supers, 4, 32)  # 64 weights each: l in low, 32 + l in high halves
    low, high = chunks & 0x0F, chunks >> 4  # groups 2c and 2c + 1, 32 values each
    groups = np.stack([low, high], axis=3)  # [N, S, 4, 2, 32]
    paired = groups[..., :16] | (groups[..., 16:] << 4)  # element p low, 16 + p high
    return paired.reshape(rows, supers * 8, 16), scale, offset


KERNEL_TYPES = {"Q4_0": 0, "Q4_1": 1, "Q4_K": 2, "Q8_0": 3}  # torch.ops.d3.pack_gguf's type numbers


def pack_gguf(raw: np.ndarray, type_name: str, rows: int, columns: int, tile_rows: int,
              unsigned: bool) -> PackedTiles:
    """A tensor's bytes ([rows, bytes per row]) of a type in PACKED_TYPES as the kernels' tiles: by d3's kernel
    (one pass, d3cli/kernels/pack.cpp) when it is loaded, else by numpy (`pack_gguf_numpy`, the same bytes)."""
    from d3cli import kernels

    if not kernels.loaded():
        return pack_gguf_numpy(raw, type_name, rows, columns, tile_rows, unsigned)
    return pack_joined([GGUFBlocks(raw, type_name, rows, columns)], tile_rows, unsigned)


def pack_gguf_numpy(raw: np.ndarray, type_name: str, rows: int, columns: int, tile_rows: int,
                    unsigned: bool, centred: bool = True) -> PackedTiles:
    """`pack_gguf` in numpy (where d3's kernels are not loaded; the reference the kernel is tested against).
    `centred`: Q4_0 without offsets (the kernels take w = (q − 8)·d), else with offsets −8d like the other types."""
    kind, block_bytes = PACKED_TYPES[type_name]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, block_bytes)
    if type_name == "Q4_K":
        pairs, scale, offset = _q4k_pairs(blocks)
    elif kind == 4:
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
    kernels run it, else made into its exact form (`exact()`: AffineInt4 or BlockInt8) or dequantized."""

    raw: np.ndarray  # [rows, bytes per row]
    type_name: str
    rows: int
    columns: int

    @property
    def kernel_kind(self) -> int:
        return PACKED_TYPES[self.type_name][0]

    def exact(self) -> AffineInt4 | BlockInt8:
        from d3cli.core.gguf_blocks import block_form

        return block_form(self.raw, self.type_name, self.rows, self.columns)

    def dequantize(self) -> torch.Tensor:
        return self.exact().dequantize()

    def packed(self, tile_rows: int, unsigned: bool) -> PackedTiles:
        return pack_gguf(self.raw, self.type_name, self.rows, self.columns, tile_rows, unsigned)


def joined(parts: list[PackedTiles]) -> PackedTiles:
    """Weights stacked by rows (whole tiles each) as one: their tiles, scales and offsets one after another, the
    scales in float32 when any part's are."""
    if len(parts) == 1:
        return parts[0]
    dtype = torch.float32 if any(part.scale.dtype == torch.float32 for part in parts) else torch.float16
    if all(part.offset is None for part in parts) or parts[0].kernel_kind == 8:
        offsets = None
    else:  # a centred Q4_0 part beside parts with offsets: its offsets, −8·scale, made (exact in float16)
        offsets = torch.cat([(part.offset if part.offset is not None else -8 * part.scale).to(dtype) for part in parts])
    return PackedTiles(parts[0].kernel_kind, torch.cat([part.tiles for part in parts]),
                       torch.cat([part.scale.to(dtype) for part in parts]), offsets,
                       sum(part.rows for part in parts), parts[0].columns)


def pack_joined(parts: list[GGUFBlocks], tile_rows: int, unsigned: bool) -> PackedTiles:
    """Weights stacked by rows (whole tiles each, all int4 or all Q8_0) packed as one: by d3's kernel straight into
    one buffer (no copy to join them), else part by part and `joined`."""
    from d3cli import kernels

    centred = all(part.type_name == "Q4_0" for part in parts)  # no offsets stored: 4.5 bits a weight, as the file
    if not kernels.loaded():
        return joined([pack_gguf_numpy(part.raw, part.type_name, part.rows, part.columns, tile_rows, unsigned,
                                       centred) for part in parts])
    kind = parts[0].kernel_kind
    counts = [-(-part.rows // tile_rows) for part in parts]
    groups, total = parts[0].columns // 32, sum(counts)
    tiles = torch.empty(total, groups * 32 * tile_rows // (1 if kind == 8 else 2), dtype=torch.uint8)
    # float16 where it holds every scale exactly (exact_scales): always Q4_0/Q4_1/Q8_0's, seldom Q4_K's (tried last)
    k_quants = any(part.type_name == "Q4_K" for part in parts)
    for dtype in (torch.float32, torch.float16) if k_quants else (torch.float16, torch.float32):
        scale = torch.empty(total, groups, tile_rows, dtype=dtype)
        offset = torch.empty_like(scale) if kind == 4 and not centred else torch.empty(0, dtype=dtype)
        exact, start = True, 0
        for part, count in zip(parts, counts):
            source = torch.from_numpy(np.ascontiguousarray(part.raw)).reshape(part.rows, -1)
            exact &= torch.ops.d3.pack_gguf_into(source, KERNEL_TYPES[part.type_name], tile_rows, unsigned,
                                                 tiles[start:start + count], scale[start:start + count],
                                                 offset[start:start + count] if offset.numel() else offset)
            start += count
            if not exact:
                break
        if exact and dtype == torch.float32 and k_quants:
            if torch.equal(scale.half().float(), scale) and torch.equal(offset.half().float(), offset):
                scale, offset = scale.half(), offset.half()
            break
        if exact:
            break
    return PackedTiles(kind, tiles, scale, offset if offset.numel() else None, sum(part.rows for part in parts),
                       parts[0].columns)
