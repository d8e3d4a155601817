"""Tiny GGUF files for tests: a two-layer Llama with random weights stored in the GGUF types a test names, and the
embedded model's tokenizer (copied from its file's metadata), written with the `gguf` package's own writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2  # 256: Q4_K and Q6_K rows need multiples of 256
HEAD_DIM = HIDDEN // HEADS
# every weight role, as [rows, columns] of the Hugging Face weight
ROLES = {"attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
         "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
         "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
RAW_BLOCKS = {"Q4_K": (144, 256), "Q6_K": (210, 256)}  # bytes and weights per block of types gguf cannot write


def tensor_bytes(values: np.ndarray, type_name: str, rng) -> tuple[np.ndarray, GGMLQuantizationType]:
    qtype = GGMLQuantizationType[type_name]
    if type_name == "F32":
        return values.astype(np.float32), qtype
    if type_name == "F16":
        return values.astype(np.float16), qtype
    if type_name in RAW_BLOCKS:  # random blocks with small float16 scales
        block_bytes, block_weights = RAW_BLOCKS[type_name]
        rows, columns = values.shape
        blocks = rng.integers(0, 256, size=(rows * columns // block_weights, block_bytes), dtype=np.uint8)
        scale_at = (0, 2) if type_name == "Q4_K" else (block_bytes - 2,)
        for start in scale_at:
            halves = rng.uniform(0.0005, 0.002, size=blocks.shape[0]).astype(np.float16)
            blocks[:, start:start + 2] = halves.view(np.uint8).reshape(-1, 2)
        return blocks.reshape(rows, -1), qtype
    return quants.quantize(values.astype(np.float32), qtype), qtype


VOCABULARY = 2048  # the embedded tokenizer's first tokens, and the merges among them: a working small BPE
_vocabularies: dict = {}


def small_vocabulary(embedded_gguf: Path):
    """The embedded model's tokenizer cut to its first VOCABULARY tokens (special tokens, bytes, the first merges):
    tokens, token types, the merges whose parts and result are kept, and the other tokenizer fields."""
    if embedded_gguf not in _vocabularies:
        source = GGUFReader(str(embedded_gguf))
        tokens = source.fields["tokenizer.ggml.tokens"].contents()[:VOCABULARY]
        kept = set(tokens)
        merges = [merge for merge in source.fields["tokenizer.ggml.merges"].contents()
                  if (parts := merge.split(" ")) and len(parts) == 2 and parts[0] in kept and parts[1] in kept
                  and parts[0] + parts[1] in kept]
        fields = {key: source.fields[key].contents() for key in
                  ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template")}
        fields.update({key: int(source.fields[f"tokenizer.ggml.{key}_token_id"].contents())
                       for key in ("bos", "eos", "padding")})
        token_types = source.fields["tokenizer.ggml.token_type"].contents()[:VOCABULARY]
        _vocabularies[embedded_gguf] = (tokens, token_types, merges, fields)
    return _vocabularies[embedded_gguf]


def write_tiny_gguf(path: Path, embedded_gguf: Path, types: dict[str, str], tied: bool = True,
                    seed: int = 0) -> Path:
    """`types`: role (a key of ROLES, or `token_embd`, `output`) -> GGUF type name; roles not named are Q4_1,
    `token_embd` Q8_0. Layer i's roles may be given as `blk.i.ROLE`."""
    rng = np.random.default_rng(seed)
    tokens, token_types, merges, fields = small_vocabulary(embedded_gguf)
    vocab = len(tokens)
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        writer.add_string(key, fields[key])
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(fields["bos"])
    writer.add_eos_token_id(fields["eos"])
    writer.add_pad_token_id(fields["padding"])

    def add(name: str, role: str, shape: tuple[int, int], default: str, scale: float):
        type_name = types.get(name.removesuffix(".weight"), types.get(role, default))
        data, qtype = tensor_bytes(rng.standard_normal(shape).astype(np.float32) * scale, type_name, rng)
        if type_name in ("F32", "F16"):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    add("token_embd.weight", "token_embd", (vocab, HIDDEN), "Q8_0", 1.0)
    for layer in range(LAYERS):
        for role, shape in ROLES.items():
            add(f"blk.{layer}.{role}.weight", role, shape, "Q4_1", shape[1] ** -0.5)
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    if not tied:
        add("output.weight", "output", (vocab, HIDDEN), "Q4_1", HIDDEN ** -0.5)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
