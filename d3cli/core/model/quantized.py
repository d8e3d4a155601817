"""Weight-only quantized linear layers and their exact source forms.

Two stored kinds:

    int4   4-bit integers q in 0..15 in groups of `group_size` (32) along the input dimension, each group with a
           scale and an offset: w = q·scale + offset.
    int8   8-bit integers with a scale per group of 32 (GGUF's Q8_0 blocks, `BlockInt8`) or per output channel
           (quantized on load): w = q·scale.

GGUF's Q4_0, Q4_1 and Q4_K store exactly the int4 form (blocks of 32 with a scale and a minimum), so a GGUF file
runs in its own precision; Q8_0 keeps its blocks, for embedding lookups (`BlockInt8Embedding`) and products
(`BlockInt8Linear`). On d3's kernels every GGUF type goes from the file into the kernels' tiles as stored
(gguf_tiles.py), the 5- and 6-bit ones (Q5_0, Q5_1, Q5_K, Q6_K) too (`StoredLinear`: int5, int6). A float weight
is quantized on load: int4 by each group's minimum and maximum (as torchao's and gpt-fast's int4 weight-only
quantization do), int8 by each row's largest magnitude.

Each layer runs on d3's own kernels (d3cli/kernels: the weights packed in tiles, activations quantized to int8 per
block of 32 as llama.cpp does, float32 activations otherwise) when they could be built on this machine, else on
torch's `aten._weight_int4pack_mm_for_cpu` / `aten._weight_int8pack_mm`, which are fast only with bfloat16
activations here. Scales are kept in float16 where that holds them exactly (a GGUF file's always), else float32.
The measurements behind these choices are in docs/PERFORMANCE.md.

Why not torchao: torchao 0.18 (the index's newest) runs int4 on the CPU only through the `mslk` package or a
bfloat16 CUDA tile layout, and its int8 weight-only tensor dequantizes the whole weight on every call (3.7 ms for a
576×1536 layer, against 0.07 ms for a kernel); it also prints load failures of its CUDA extensions on import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from d3cli import kernels

GROUP_SIZE = 32  # GGUF's block size; the int4 kernel takes 32, 64, 128 or 256
INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_ROW_MULTIPLE = 16  # the int4 packing needs the output dimension in multiples of 16 (padded here)
INT8_COLUMN_MULTIPLE = 32  # the bfloat16 int8 kernel gives wrong results (or crashes) for K not a multiple of 8


@dataclass(frozen=True)
class AffineInt4:
    """w[n, k] = q[n, k]·scale[n, k // G] + offset[n, k // G], q in 0..15: a weight as 4-bit groups, exactly."""

    q: torch.Tensor  # [N, K] uint8, 0..15
    scale: torch.Tensor  # [N, K // G] float32
    offset: torch.Tensor  # [N, K // G] float32

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        groups = self.q.reshape(self.q.shape[0], -1, self.group_size).float()
        return (groups * self.scale[..., None] + self.offset[..., None]).reshape(self.q.shape)

    def nibbles(self) -> torch.Tensor:
        """q two to a byte, [N, K / 2] uint8 (element 2j in the low half): how a cache stores it."""
        return (self.q[:, 0::2] | (self.q[:, 1::2] << 4)).contiguous()

    @classmethod
    def from_nibbles(cls, nibbles: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> AffineInt4:
        q = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=-1).reshape(nibbles.shape[0], -1)
        return cls(q.contiguous(), scale, offset)


@dataclass(frozen=True)
class BlockInt8:
    """w[n, k] = q[n, k]·scale[n, k // G], q in -128..127: GGUF's Q8_0 blocks, exactly."""

    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N, K // G] float32

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        groups = self.q.reshape(self.q.shape[0], -1, self.group_size).float()
        return (groups * self.scale[..., None]).reshape(self.q.shape)


def quantize_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> AffineInt4:
    """A float weight [N, K] as 4-bit groups by each group's minimum and maximum: scale = (max − min) / 15,
    offset = min (a group of equal values keeps its value exactly)."""
    rows, columns = weight.shape
    groups = weight.detach().float().reshape(rows, columns // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = (high - low) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((groups - low[..., None]) / safe[..., None]).round().clamp(0, 15).to(torch.uint8)
    return AffineInt4(q.reshape(rows, columns), scale, low)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] as int8 per output channel: (q [N, K] int8, scale [N] float32), scale = max|w| / 127."""
    weight = weight.detach()
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], 1024):  # in slices of rows: no temporaries of the whole weight's size
        rows = weight[start:start + 1024].float()
        scale[start:start + 1024] = rows.abs().amax(dim=1) / 127
        part = scale[start:start + 1024]
        safe = torch.where(part > 0, part, torch.ones_like(part))
        q[start:start + 1024] = (rows / safe[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def fits_int4(in_features: int, group_size: int = GROUP_SIZE) -> bool:
    return in_features % group_size == 0


def fits_int8(in_features: int) -> bool:
    return in_features % INT8_COLUMN_MULTIPLE == 0


def exact_scales(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Scales (and offsets) in float16 when float16 holds every one of them exactly, else in float32."""
    values = [tensor.float() for tensor in tensors]
    if all(torch.equal(value.half().float(), value) for value in values):
        return tuple(value.half() for value in values)
    return tuple(values)


def _tiles_of(rows: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """[N, ...] padded with zero rows to whole tiles: [tiles, tile_rows, ...]."""
    padded = -rows.shape[0] % tile_rows
    if padded:
        rows = torch.cat([rows, rows.new_zeros(padded, *rows.shape[1:])])
    return rows.reshape(-1, tile_rows, *rows.shape[1:])


def pack_tile_scales(scale: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """[N, groups] as [tiles, groups, tile_rows] (d3cli/kernels/blocks.h)."""
    return _tiles_of(scale, tile_rows).transpose(1, 2).contiguous()


def pack_int4_tiles(q: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """q [N, K] in 0..15 as d3's q4 tiles: per tile and block of 32, byte (j, r, i) holds row r's element 4j + i in
    its low half and element 16 + 4j + i in its high half."""
    tiles = _tiles_of(q.to(torch.uint8), tile_rows)
    count, rows, columns = tiles.shape
    halves = tiles.reshape(count, rows, columns // 32, 2, 4, 4).permute(0, 2, 3, 4, 1, 5)  # t, b, half, j, r, i
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(count, -1).contiguous()


def pack_int8_tiles(q: torch.Tensor, tile_rows: int, unsigned: bool) -> torch.Tensor:
    """q [N, K] int8 as d3's q8 tiles: per tile and block of 32, byte (j, r, i) holds row r's element 4j + i, as
    w + 128 when `unsigned`."""
    tiles = _tiles_of(q.to(torch.int8), tile_rows)
    count, rows, columns = tiles.shape
    quads = tiles.reshape(count, rows, columns // 32, 8, 4).permute(0, 2, 3, 1, 4)  # t, b, j, r, i
    values = quads.contiguous().view(torch.uint8)
    if unsigned:  # w + 128 as a byte is w's two's-complement byte with its top bit flipped
        values.bitwise_xor_(0x80)
    return values.reshape(count, -1)


K_QUANT_KINDS = (14, 15, 16)  # the kernels' kinds of a k-quant's superblocks (d3cli/kernels/blocks.h)


def tiles_group_size(kernel_kind: int) -> int:
    """Weights a scale covers in the tiles: a block of 32, or a k-quant's superblock of 256."""
    return 256 if kernel_kind in K_QUANT_KINDS else 32

class TiledWeights(nn.Module):
    """A weight in d3's tiles: what the kernels' operators and `decoder_layer` take (see d3cli/kernels)."""

    def __init__(self, kernel_kind: int, q: torch.Tensor | None, scale: torch.Tensor, offset: torch.Tensor | None,
                 bias: torch.Tensor | None, group_size: int, packed=None):
        """From q [N, K] with its scales (and offsets) per group, or already `packed` (gguf_tiles.PackedTiles: then
        q, scale and offset are ignored)."""
        super().__init__()
        self.kernel_kind, self.group_size = kernel_kind, group_size
        if packed is not None:

            self.kernel_kind, self.group_size = packed.kernel_kind, tiles_group_size(packed.kernel_kind)
            self.out_features, self.in_features = packed.rows, packed.columns
            tiles, scale_tiles, offset_tiles = packed.tiles, packed.scale, packed.offset
        else:
            tile_rows, unsigned = kernels.layout()
            self.out_features, self.in_features = q.shape
            scales = exact_scales(scale) if offset is None else exact_scales(scale, offset)
            tiles = pack_int4_tiles(q, tile_rows) if kernel_kind == 4 else pack_int8_tiles(q, tile_rows, unsigned)
            scale_tiles = pack_tile_scales(scales[0], tile_rows)
            offset_tiles = None if offset is None else pack_tile_scales(scales[1], tile_rows)
        self.register_buffer("tiles", tiles)
        self.register_buffer("scale", scale_tiles)
        self.register_buffer("offset", offset_tiles)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, self.in_features)
        out = torch.ops.d3.tiled_linear(flat, self.kernel_kind, self.tiles, self.scale, self.offset, self.group_size,
                                        self.out_features)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*hidden.shape[:-1], self.out_features)

    def part(self) -> tuple[list, list[int]]:
        """This weight as one part of `torch.ops.d3.decoder_layer`: its tensors and (kind, group size, rows)."""
        return [self.tiles, self.scale, self.offset, self.bias], [self.kernel_kind, self.group_size, self.out_features]

    def weight_bytes(self) -> int:
        return tensor_bytes(self.tiles, self.scale, self.offset, self.bias)


class QuantizedLinear(nn.Module):
    """The base of d3's quantized linear layers. On d3's kernels each holds its weight as `tiled` (TiledWeights: one
    call of torch.ops.d3.tiled_linear for any kind); without them a subclass computes the product on torch's
    kernels (`torch_forward`) from what it keeps itself (`torch_weight_bytes`)."""

    kind = ""
    in_features: int
    out_features: int

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.tiled is not None:
            return self.tiled(hidden)
        return self.torch_forward(hidden)

    def torch_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{type(self).__name__} is built on d3's kernels only")

    def weight_bytes(self) -> int:
        return self.tiled.weight_bytes() if self.tiled is not None else self.torch_weight_bytes()

    def torch_weight_bytes(self) -> int:
        return 0

    def detail(self) -> str:
        return ""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}{self.detail()}"


class Int4Linear(QuantizedLinear):
    """A linear layer whose weight is `AffineInt4` groups: d3's q4 kernel, else `aten._weight_int4pack_mm_for_cpu`."""

    kind = "int4"

    def __init__(self, weight: AffineInt4 | None, bias: torch.Tensor | None, dtype: torch.dtype, packed=None):
        super().__init__()
        if packed is not None:  # the file's blocks already in d3's tiles (gguf_tiles.py): d3's kernels only
            self.in_features, self.out_features, self.group_size = packed.columns, packed.rows, GROUP_SIZE
            self.tiled = TiledWeights(4, None, None, None, bias, GROUP_SIZE, packed)
            return
        rows, columns = weight.q.shape
        self.in_features, self.out_features, self.group_size = columns, rows, weight.group_size
        self.tiled = None
        if kernels.available():
            self.tiled = TiledWeights(4, weight.q, weight.scale, weight.offset, bias, weight.group_size)
            return
        padded = -rows % INT4_ROW_MULTIPLE
        q, scale, offset = weight.q, weight.scale, weight.offset
        if padded:  # zero rows: their outputs are cut off again
            q = torch.cat([q, q.new_zeros(padded, columns)])
            scale = torch.cat([scale, scale.new_zeros(padded, scale.shape[1])])
            offset = torch.cat([offset, offset.new_zeros(padded, offset.shape[1])])
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        zero = offset + 8 * scale  # the kernel computes (q − 8)·scale + zero
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
                             .to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def torch_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, self.in_features)
        if flat.dtype != self.scales_and_zeros.dtype:
            flat = flat.to(self.scales_and_zeros.dtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_and_zeros)
        if out.shape[-1] != self.out_features:
            out = out[:, : self.out_features]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*hidden.shape[:-1], self.out_features)

    def torch_weight_bytes(self) -> int:
        return tensor_bytes(self.packed, self.scales_and_zeros, self.bias)

    def detail(self) -> str:
        return f", group_size={self.group_size}"


class StoredLinear(QuantizedLinear):
    """A linear layer whose weight is a GGUF file's 5- or 6-bit blocks (Q5_0, Q5_1, Q5_K, Q6_K) as the file stores
    them, packed in d3's tiles (gguf_tiles.py): d3's kernels only (without them these types run as int8)."""

    def __init__(self, packed, bias: torch.Tensor | None, kind: str):
        super().__init__()
        self.kind = kind  # "int5" or "int6"
        self.out_features, self.in_features = packed.rows, packed.columns
        self.tiled = TiledWeights(packed.kernel_kind, None, None, None, bias, GROUP_SIZE, packed)

    def detail(self) -> str:
        return f", {self.kind} as stored"


class Int8Linear(QuantizedLinear):
    """A linear layer whose weight is int8 per output channel: d3's q8 kernel (one group a row), else
    `aten._weight_int8pack_mm`."""

    kind = "int8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.tiled = None
        if kernels.available() and self.in_features % 32 == 0:
            self.tiled = TiledWeights(8, q, scale.float()[:, None], None, bias, self.in_features)
            return
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scale", scale.detach().to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def torch_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, self.in_features)
        if flat.dtype != self.scale.dtype:
            flat = flat.to(self.scale.dtype)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*hidden.shape[:-1], self.out_features)

    def torch_weight_bytes(self) -> int:
        return tensor_bytes(self.q, self.scale, self.bias)


class BlockInt8Linear(QuantizedLinear):
    """A linear layer whose weight is GGUF's Q8_0 blocks, exactly: d3's q8 kernel, else torch's int4 kernel with
    each q in -128..127 split into two 4-bit halves, q + 128 = 16·high + low, so w = q·d = 16d·high + d·low − 128d,
    a product of the input repeated twice ([x, x]) with [high | low] in groups of 32 (as fast as per-channel int8
    there, which would re-quantize the blocks)."""

    kind = "int8"

    def __init__(self, table: BlockInt8 | None, bias: torch.Tensor | None, dtype: torch.dtype, packed=None):
        super().__init__()
        self.tiled = self.halves = None
        if packed is not None:  # the file's blocks already in d3's tiles (gguf_tiles.py): d3's kernels only
            self.out_features, self.in_features = packed.rows, packed.columns
            self.tiled = TiledWeights(8, None, None, None, bias, GROUP_SIZE, packed)
            return
        self.out_features, self.in_features = table.q.shape
        if kernels.available():
            self.tiled = TiledWeights(8, table.q, table.scale, None, bias, table.group_size)
            return
        shifted = table.q.to(torch.int16) + 128
        high, low = (shifted >> 4).to(torch.uint8), (shifted & 0x0F).to(torch.uint8)
        scale = table.scale.float()
        halves = AffineInt4(torch.cat([high, low], dim=1), torch.cat([16 * scale, scale], dim=1),
                            torch.cat([-128 * scale, torch.zeros_like(scale)], dim=1))
        self.halves = Int4Linear(halves, bias, dtype)  # torch's kernel: d3's are not available here

    def torch_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.halves(torch.cat([hidden, hidden], dim=-1))

    def torch_weight_bytes(self) -> int:
        return self.halves.weight_bytes()

    def detail(self) -> str:
        return ", blocks of 32"


def tensor_bytes(*tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if isinstance(tensor, torch.Tensor))
