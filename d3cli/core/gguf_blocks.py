"""A GGUF file's quantized tensors as they are stored: Q4_0, Q4_1 and Q4_K as 4-bit groups of 32 (`AffineInt4`),
Q8_0 as 8-bit blocks of 32 (`BlockInt8`), under the model's own parameter names.

Transformers only dequantizes a GGUF file. To run it in its own precision d3 reads the blocks itself (the `gguf`
package's reader, with its Q4_K scale unpacking), names each tensor as transformers does (its GGUF→Hugging Face
name map and tensor processor, which also undoes llama.cpp's row permutation of the query and key projections) and
keeps a block form only when it dequantizes to exactly the tensor transformers produced: anything else (another
architecture's processing, a type without an exact form) stays a float tensor and is quantized from that.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from d3cli.core.quantized import AffineInt4, BlockInt8

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # stored as 4-bit groups of 32 with a scale and an offset
INT8_TYPES = ("Q8_0",)  # 8-bit blocks of 32 with a scale
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
# How many bits a weight takes in each other type: the nearest kind of a type without an exact form.
TYPE_BITS = {"Q2_K": 2, "Q3_K": 3, "IQ1_S": 1, "IQ1_M": 1, "IQ2_XXS": 2, "IQ2_XS": 2, "IQ2_S": 2, "IQ3_XXS": 3,
             "IQ3_S": 3, "IQ4_NL": 4, "IQ4_XS": 4, "TQ1_0": 2, "TQ2_0": 2, "MXFP4": 4, "NVFP4": 4,
             "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6, "Q8_1": 8, "Q8_K": 8}


def nearest_kind(gguf_type: str) -> str:
    """The weight kind a GGUF type runs as by default: int4 up to 4 bits, int8 above, float for float types."""
    if gguf_type in FLOAT_TYPES:
        return "float"
    if gguf_type in INT4_TYPES:
        return "int4"
    if gguf_type in INT8_TYPES:
        return "int8"
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
        return AffineInt4(torch.from_numpy(q.reshape(rows, columns).astype(np.uint8)),
                          torch.from_numpy(scale.reshape(rows, groups).copy()),
                          torch.from_numpy(offset.reshape(rows, groups).copy()))
    if gguf_type == "Q8_0":
        q, scale = decode_q8_0(flat.reshape(-1, 34))
        return BlockInt8(torch.from_numpy(q.reshape(rows, columns).copy()),
                         torch.from_numpy(scale.reshape(rows, columns // 32).copy()))
    return None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: its name, type, [rows, columns] and its bytes ([rows, bytes per row])."""

    name: str
    type_name: str
    rows: int
    columns: int
    data: np.ndarray


_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


def read_gguf(path: Path) -> tuple[dict[str, str], list[TensorInfo]]:
    """A GGUF file's string metadata and its tensors, read straight from the header (the gguf package's reader
    decodes every metadata value, which takes ~5 s for the embedded model's 98 000 tokenizer strings)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as handle:
        def unpack(layout: str):
            return struct.unpack("<" + layout, handle.read(struct.calcsize("<" + layout)))

        def string() -> str:
            (length,) = unpack("Q")
            return handle.read(length).decode("utf-8", errors="replace")

        def skip(value_type: int) -> None:
            if value_type == _STRING:
                (length,) = unpack("Q")
                handle.seek(length, 1)
            elif value_type == _ARRAY:
                element_type, count = unpack("IQ")
                if element_type in _FIXED_SIZES:
                    handle.seek(count * _FIXED_SIZES[element_type], 1)
                else:
                    for _ in range(count):
                        skip(element_type)
            else:
                handle.seek(_FIXED_SIZES[value_type], 1)

        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
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
        qtype = GGMLQuantizationType(type_id)
        block_weights, block_bytes = GGML_QUANT_SIZES[qtype]
        columns, rows = int(shape[0]), int(np.prod(shape[1:], dtype=np.int64))
        row_bytes = columns // block_weights * block_bytes
        data = contents[start + offset: start + offset + rows * row_bytes].reshape(rows, row_bytes)
        tensors.append(TensorInfo(name, qtype.name, rows, columns, data))
    return strings, tensors


def _permute_rows(form, order: torch.Tensor):
    if isinstance(form, AffineInt4):
        return AffineInt4(form.q[order], form.scale[order], form.offset[order])
    return BlockInt8(form.q[order], form.scale[order])


def read_block_forms(gguf_path: Path, model) -> tuple[dict[str, object], dict[str, str]]:
    """The exact block forms of `model`'s weights in `gguf_path` (the model transformers loaded from that file),
    by parameter name, and every mapped tensor's GGUF type by parameter name. A form is kept only where it
    dequantizes to exactly the model's float tensor."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    config = model.config.get_text_config(decoder=True)
    processor_config = {"num_attention_heads": getattr(config, "num_attention_heads", None),
                        "num_key_value_heads": getattr(config, "num_key_value_heads", None)}
    strings, tensors = read_gguf(gguf_path)
    architecture = strings.get("general.architecture", "")
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=processor_config)
    names = get_gguf_hf_weights_map(model, processor)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    forms, types = {}, {}
    for tensor in tensors:
        gguf_type = tensor.type_name
        name = names.get(tensor.name)
        if name is None or name not in parameters:
            continue
        types[name] = gguf_type
        target = parameters[name]
        if target.dim() != 2 or target.shape[1] % 32 or (tensor.rows, tensor.columns) != tuple(target.shape):
            continue
        rows, columns = target.shape
        form = block_form(tensor.data, gguf_type, rows, columns)
        if form is None:
            continue
        order = _row_order(processor, tensor.name, rows, names)
        if order is not None:
            form = _permute_rows(form, order)
        if same_values(form.dequantize(), target.detach().float().cpu()):
            forms[name] = form
    return forms, types


def _row_order(processor, gguf_name: str, rows: int, names: dict) -> torch.Tensor | None:
    """The row order transformers' tensor processor gives this tensor (llama.cpp permutes the query and key rows
    for its rotary layout), found by processing the row numbers themselves; None when it keeps them."""
    processed = processor.process(weights=np.arange(rows, dtype=np.int64).reshape(rows, 1), name=gguf_name,
                                  tensor_key_mapping=names, parsed_parameters={"tensors": {}, "config": {}})
    order = np.asarray(processed.weights).reshape(-1)
    if order.shape[0] != rows or np.array_equal(order, np.arange(rows)):
        return None
    return torch.from_numpy(order.copy())


def same_values(dequantized: torch.Tensor, reference: torch.Tensor) -> bool:
    """True when a block form dequantizes to the tensor transformers made, to float32 rounding: (q − 8)·d and
    q·d − 8d differ in the last bit, a wrong row order or name by whole weights."""
    if dequantized.shape != reference.shape:
        return False
    bound = 1e-6 * float(reference.abs().max()) + 1e-30
    return bool((dequantized - reference).abs().max() <= bound)
