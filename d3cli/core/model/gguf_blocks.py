"""A GGUF file's header and its quantized tensors as they are stored: Q4_0, Q4_1 and Q4_K as 4-bit groups of 32
(`AffineInt4`), Q8_0 as 8-bit blocks of 32 (`BlockInt8`); d3's kernels also run Q5_0, Q5_1, Q5_K and Q6_K as
stored (gguf_tiles.py), which have no such torch form.

Transformers only dequantizes a GGUF file. To run it in its own precision d3 reads the header itself (`read_gguf`)
and each tensor's blocks straight from their bytes (`block_form`, with the `gguf` package's Q4_K scale unpacking);
gguf_weights.py names them as transformers does and applies transformers' tensor processing (`row_order`: the
query and key rows llama.cpp permutes for its rotary layout). tests/core/model/test_gguf_weights.py holds every form
against transformers' own dequantized reading of the same file.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from d3cli import kernels
from d3cli.core.model.quantized import AffineInt4, BlockInt8

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # stored as 4-bit groups of 32 with a scale and an offset
INT8_TYPES = ("Q8_0",)  # 8-bit blocks of 32 with a scale
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
# How many bits a weight takes in each other type: the nearest kind of a type without an exact form.
TYPE_BITS = {"Q2_K": 2, "Q3_K": 3, "IQ1_S": 1, "IQ1_M": 1, "IQ2_XXS": 2, "IQ2_XS": 2, "IQ2_S": 2, "IQ3_XXS": 3,
             "IQ3_S": 3, "IQ4_NL": 4, "IQ4_XS": 4, "TQ1_0": 2, "TQ2_0": 2, "MXFP4": 4, "NVFP4": 4,
             "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6, "Q8_1": 8, "Q8_K": 8}


STORED_KINDS = {"Q5_0": "int5", "Q5_1": "int5", "Q5_K": "int5", "Q6_K": "int6"}  # on d3's kernels, as stored


def nearest_kind(gguf_type: str) -> str:
    """The weight kind a GGUF type runs as by default: its own where d3 runs it as stored (int4, int5, int6, int8),
    else int4 up to 4 bits and int8 above; float for float types. int5 and int6 exist on d3's kernels only (without
    them those types run as int8)."""
    if gguf_type in FLOAT_TYPES:
        return "float"
    if gguf_type in INT4_TYPES:
        return "int4"
    if gguf_type in INT8_TYPES:
        return "int8"
    if gguf_type in STORED_KINDS:
        return STORED_KINDS[gguf_type]
    return "int4" if TYPE_BITS.get(gguf_type, 8) <= 4 else "int8"


def _halves(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, as float32 [blocks, 1]."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """GGUF's 16-byte nibble blocks [blocks, 16] → [blocks, 32] values 0..15: low halves first, then high halves."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def decode_q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[blocks, 18] bytes → (q [blocks, 32], scale [blocks], offset [blocks]): w = (q − 8)·d."""
    scale = _halves(blocks, 0)[:, 0]
    return _nibbles(blocks[:, 2:18]), scale, -8 * scale


def decode_q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[blocks, 20] bytes → (q, scale, offset): w = q·d + m."""
    return _nibbles(blocks[:, 4:20]), _halves(blocks, 0)[:, 0], _halves(blocks, 2)[:, 0]


def decode_q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[blocks, 144] bytes (256 weights: 8 groups of 32 with 6-bit scales and minimums) → (q [blocks·8, 32],
    scale, offset): w = d·sc·q − dmin·m, per group."""
    from gguf.quants import Q4_K

    d, dmin = _halves(blocks, 0), _halves(blocks, 2)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16].copy())
    scale = (d * sc.astype(np.float32)).reshape(-1)
    offset = -(dmin * m.astype(np.float32)).reshape(-1)
    packed = blocks[:, 16:144].reshape(-1, 4, 32)  # four chunks of 64 weights: low nibbles, then high nibbles
    q = np.stack([packed & 0x0F, packed >> 4], axis=2).reshape(-1, 32)
    return q, scale, offset


def decode_q8_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[blocks, 34] bytes → (q [blocks, 32] int8, scale [blocks]): w = q·d."""
    return blocks[:, 2:34].copy().view(np.int8), _halves(blocks, 0)[:, 0]


INT4_DECODERS = {"Q4_0": decode_q4_0, "Q4_1": decode_q4_1, "Q4_K": decode_q4_k}


def block_form(raw: np.ndarray, gguf_type: str, rows: int, columns: int) -> AffineInt4 | BlockInt8 | None:
    """A tensor's bytes ([rows, bytes per row] as the gguf reader gives them) as its exact form, or None when the
    type has none."""
    flat = np.ascontiguousarray(raw).reshape(-1)
    if gguf_type in INT4_DECODERS:
        block_bytes = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}[gguf_type]
        q, scale, offset = INT4_DECODERS[gguf_type](flat.reshape(-1, block_bytes))
        groups = columns // 32
        # the decoders' arrays are new, so no second copy (a fresh copy of a large table is mostly page faults)
        return AffineInt4(torch.from_numpy(q.reshape(rows, columns).astype(np.uint8, copy=False)),
                          torch.from_numpy(np.ascontiguousarray(scale.reshape(rows, groups))),
                          torch.from_numpy(np.ascontiguousarray(offset.reshape(rows, groups))))
    if gguf_type == "Q8_0":
        q, scale = decode_q8_0(flat.reshape(-1, 34))
        return BlockInt8(torch.from_numpy(q.reshape(rows, columns)),
                         torch.from_numpy(np.ascontiguousarray(scale.reshape(rows, columns // 32))))
    return None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: its name, type, [rows, columns] (rows: every dimension but the first of GGUF's),
    its shape as numpy and Hugging Face order it (GGUF's dimensions reversed), and where its bytes lie in the file.
    `data` is a memory-mapped view ([rows, bytes per row]); `read()` copies them out of the file."""

    name: str
    type_name: str
    rows: int
    columns: int
    data: np.ndarray
    shape: tuple[int, ...] = ()
    path: str = ""
    offset: int = 0  # from the start of the file
    nbytes: int = 0

    def read(self) -> np.ndarray:
        """The tensor's bytes as [rows, bytes per row], mapped from the file for as long as they are used."""
        return self.read_rows(0, self.rows)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of the tensor's bytes, [stop - start, bytes per row], mapped from the file."""
        row_bytes = self.nbytes // self.rows if self.rows else 0
        wanted = (stop - start) * row_bytes
        if os.path.getsize(self.path) < self.offset + start * row_bytes + wanted:
            raise ValueError(f"tensor {self.name} is cut short: the file ends inside it")
        if wanted == 0:
            return np.zeros((stop - start, row_bytes), dtype=np.uint8)
        # a mapping of its own (no copy through a read buffer), unmapped when the last view of it goes
        return np.memmap(self.path, dtype=np.uint8, mode="c", offset=self.offset + start * row_bytes,
                         shape=(stop - start, row_bytes))


class GGUFHeader(NamedTuple):
    strings: dict[str, str]  # the metadata's string values
    tensors: list[TensorInfo]
    data_start: int  # where the tensors' data begins: everything before is metadata and tensor descriptions


_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


def read_gguf(path: Path) -> GGUFHeader:
    """A GGUF file's string metadata and its tensors, read straight from the header (the gguf package's reader
    decodes every metadata value, which takes ~5 s for the embedded model's 98 000 tokenizer strings). A ValueError
    names what is wrong with a file that is not one, or is cut short (naming the first tensor past its end)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        def unpack(layout: str):
            wanted = struct.calcsize("<" + layout)
            raw = handle.read(wanted)
            if len(raw) != wanted:
                raise ValueError(f"{path} is cut short inside its header")
            return struct.unpack("<" + layout, raw)

        def string() -> str:
            (length,) = unpack("Q")
            if length > size:
                raise ValueError(f"{path} has a corrupt header (a string of {length} bytes)")
            return handle.read(length).decode("utf-8", errors="replace")

        def skip(value_type: int) -> None:
            if value_type == _STRING:
                (length,) = unpack("Q")
                handle.seek(length, 1)
            elif value_type == _ARRAY:
                element_type, count = unpack("IQ")
                if element_type in _FIXED_SIZES:
                    handle.seek(count * _FIXED_SIZES[element_type], 1)
                elif element_type == _STRING:  # a tokenizer's strings: their lengths walked in a mapping
                    handle.seek(_skip_strings(path, handle.tell(), count, size))
                else:
                    for _ in range(count):
                        skip(element_type)
            elif value_type in _FIXED_SIZES:
                handle.seek(_FIXED_SIZES[value_type], 1)
            else:
                raise ValueError(f"{path} has a corrupt header (value type {value_type})")

        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
        version, tensor_count, kv_count = unpack("IQQ")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        strings, alignment = {}, 32
        for _ in range(kv_count):
            key = string()
            (value_type,) = unpack("I")
            if value_type == _STRING:
                strings[key] = string()
            elif key == "general.alignment" and value_type in _FIXED_SIZES:
                (alignment,) = unpack({4: "I", 10: "Q"}.get(value_type, "I"))
            else:
                skip(value_type)
        infos = []
        for _ in range(tensor_count):
            name = string()
            (dimensions,) = unpack("I")
            shape = unpack("Q" * dimensions)
            type_id, offset = unpack("IQ")
            infos.append((name, type_id, shape, offset))
        start = -(-handle.tell() // alignment) * alignment
    contents = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = []
    for name, type_id, shape, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"tensor {name} has GGML type {type_id}, which this gguf package does not know") from None
        block_weights, block_bytes = GGML_QUANT_SIZES[qtype]
        columns, rows = int(shape[0]), int(np.prod(shape[1:], dtype=np.int64))
        row_bytes = columns // block_weights * block_bytes
        begin, end = start + offset, start + offset + rows * row_bytes
        if end > size:
            raise ValueError(f"tensor {name} ends at byte {end:,} but the file has {size:,} bytes: the file is "
                             "truncated or corrupt")
        data = contents[begin:end].reshape(rows, row_bytes)
        tensors.append(TensorInfo(name, qtype.name, rows, columns, data, tuple(int(d) for d in reversed(shape)),
                                  str(path), begin, end - begin))
    return GGUFHeader(strings, tensors, start)


def _skip_strings(path: Path, position: int, count: int, size: int) -> int:
    """Where `count` GGUF strings (a length, then its bytes) starting at `position` end."""
    length_of = struct.Struct("<Q").unpack_from
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        for _ in range(count):
            if position + 8 > size:
                raise ValueError(f"{path} is cut short inside its header")
            position += 8 + length_of(mapped, position)[0]
    if position > size:
        raise ValueError(f"{path} is cut short inside its header")
    return position


def header_digest(path: Path, header: GGUFHeader) -> str:
    """A key for what a GGUF file's header says (metadata, tokenizer, tensor names, types and places) and its
    size: what d3 derives from a file once and caches. The weights are read from the file itself at every load."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        remaining = header.data_start
        while remaining > 0:
            block = handle.read(min(remaining, 1 << 20))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
    digest.update(str(os.path.getsize(path)).encode())
    return digest.hexdigest()


KEEPS_ROWS = "keeps"  # row_order: the processor leaves the tensor as it is


def row_order(processor, gguf_name: str, rows: int, names: dict) -> torch.Tensor | str | None:
    """What transformers' tensor processor does to this 2-D tensor, found by processing the row numbers themselves:
    KEEPS_ROWS, the row order it gives (llama.cpp permutes the query and key rows for its rotary layout), or None
    when it does more than reorder rows (changes values or shape: then the block form cannot be kept)."""
    numbers = np.arange(rows, dtype=np.float64).reshape(rows, 1)
    try:
        processed = processor.process(weights=numbers.copy(), name=gguf_name, tensor_key_mapping=names,
                                      parsed_parameters={"tensors": {}, "config": {}})
    except Exception:  # a processor that needs the real shape: let it process the dequantized tensor
        return None
    if processed.name != gguf_name or np.shape(processed.weights) != (rows, 1):
        return None
    order = np.asarray(processed.weights).reshape(-1)
    if np.array_equal(order, numbers.reshape(-1)):
        return KEEPS_ROWS
    if not np.array_equal(np.sort(order), numbers.reshape(-1)):
        return None
    return torch.from_numpy(order.astype(np.int64))


def same_values(dequantized: torch.Tensor, reference: torch.Tensor) -> bool:
    """True when a block form dequantizes to the tensor transformers made, to float32 rounding: (q − 8)·d and
    q·d − 8d differ in the last bit, a wrong row order or name by whole weights."""
    if dequantized.shape != reference.shape:
        return False
    bound = 1e-6 * float(reference.abs().max()) + 1e-30
    return bool((dequantized - reference).abs().max() <= bound)


def dequantized(raw: np.ndarray, type_name: str) -> torch.Tensor:
    """Rows of a tensor's bytes (GGML type `type_name`) dequantized to float32 as the gguf package does: F32 and F16
    read as they are (what the package does, without importing it on a warm start), Q6_K by d3's kernel where it is
    loaded (the same values, to the bit, ~10x faster), any type by the gguf package otherwise."""
    if type_name in ("F32", "F16"):
        rows = np.ascontiguousarray(raw).view(np.float32 if type_name == "F32" else np.float16)
        return torch.from_numpy(rows.astype(np.float32, copy=False))  # F32 as it is, F16 widened
    if type_name == "Q6_K" and kernels.loaded() and raw.shape[-1] % 210 == 0:
        rows = torch.from_numpy(np.ascontiguousarray(raw)).reshape(-1, raw.shape[-1])
        return torch.ops.d3.dequantize_q6_k(rows)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return torch.from_numpy(np.asarray(dequantize(raw, GGMLQuantizationType[type_name]), dtype=np.float32))
