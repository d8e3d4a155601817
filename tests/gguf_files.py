"""Small GGUF files for tests: a two-layer model of a family (Llama, Qwen2, Qwen3, Gemma 2/3, Phi-3) with random weights
stored in the GGUF types a test names, and the embedded model's tokenizer (copied from its file's metadata), written
with the `gguf` package's own writer; `Shape` makes bigger ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2  # 256: Q4_K and Q6_K rows need multiples of 256
# bytes and weights per block of the types written as random blocks (gguf cannot write the K types; Q4_0 is
# written this way for big files, where quantizing random floats would take long)
RAW_BLOCKS = {"Q4_K": (144, 256), "Q5_K": (176, 256), "Q6_K": (210, 256), "Q4_0": (18, 32)}
SCALE_BYTES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q4_0": (0,)}  # where each block's float16 scales lie
# One layer of every kind d3 meets: exact 4-bit types, Q8_0, a 6-bit type without an exact form, a float type.
MIXED = {"blk.0.attn_q": "Q4_0", "blk.0.attn_v": "Q6_K", "blk.0.attn_output": "Q4_K", "blk.0.ffn_down": "Q8_0",
         "blk.1.ffn_down": "F16"}
EXACT = {"blk.0.attn_q": "Q4_0", "blk.0.attn_output": "Q4_K", "output": "Q4_1"}  # every linear layer exact


def tensor_bytes(shape: tuple[int, int], scale: float, type_name: str, rng) -> tuple[np.ndarray, GGMLQuantizationType]:
    """A random tensor of `shape` ([rows, columns]) stored as `type_name`: normal values times `scale` quantized
    by the gguf package, or (big Q4_0 tensors and types it cannot write) random blocks with small float16 scales."""
    qtype = GGMLQuantizationType[type_name]
    rows, columns = shape
    if type_name in RAW_BLOCKS and (type_name != "Q4_0" or rows * columns > 1 << 22):
        block_bytes, block_weights = RAW_BLOCKS[type_name]
        blocks = rng.integers(0, 256, size=(rows * columns // block_weights, block_bytes), dtype=np.uint8)
        for start in SCALE_BYTES[type_name]:
            halves = rng.uniform(0.0005, 0.002, size=blocks.shape[0]).astype(np.float16)
            blocks[:, start:start + 2] = halves.view(np.uint8).reshape(-1, 2)
        if type_name in ("Q4_K", "Q5_K"):  # block scales and minimums up to 15 (not 63): weights of a few hundredths
            blocks[:, 4:16] &= 0x0F
        if type_name == "Q6_K":  # int8 block scales within ±8 (not ±128)
            blocks[:, 192:208] = rng.integers(-8, 9, size=(blocks.shape[0], 16)).astype(np.int8).view(np.uint8)
        return blocks.reshape(rows, -1), qtype
    values = rng.standard_normal(shape).astype(np.float32) * scale
    if type_name == "F32":
        return values, qtype
    if type_name == "F16":
        return values.astype(np.float16), qtype
    return quants.quantize(values, qtype), qtype


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


@dataclass(frozen=True)
class Shape:
    hidden: int = HIDDEN
    ffn: int = FFN
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    layers: int = LAYERS

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def roles(self, fused: bool = False) -> dict[str, tuple[int, int]]:
        """Every linear weight of a layer, as [rows, columns] of the Hugging Face weight; `fused`: Phi-3's, with
        query, key and value in one tensor (attn_qkv) and gate and up in another (ffn_up, twice the rows)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if fused:
            return {"attn_qkv": (q + 2 * kv, self.hidden), "attn_output": (self.hidden, q),
                    "ffn_up": (2 * self.ffn, self.hidden), "ffn_down": (self.hidden, self.ffn)}
        return {"attn_q": (q, self.hidden), "attn_k": (kv, self.hidden), "attn_v": (kv, self.hidden),
                "attn_output": (self.hidden, q), "ffn_gate": (self.ffn, self.hidden),
                "ffn_up": (self.ffn, self.hidden), "ffn_down": (self.hidden, self.ffn)}


# The families the tests write: the layer's norms beside attn_norm/ffn_norm, whether q/k/v have biases, and
# whether norms are stored as 1 + w (llama.cpp's Gemma convention).
FAMILIES = {
    "llama": {"norms": (), "qkv_bias": False},
    "qwen2": {"norms": (), "qkv_bias": True},
    "qwen3": {"norms": ("attn_q_norm", "attn_k_norm"), "qkv_bias": False},
    "gemma2": {"norms": ("post_attention_norm", "post_ffw_norm"), "qkv_bias": False},
    "gemma3": {"norms": ("post_attention_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm"), "qkv_bias": False},
    "phi3": {"norms": (), "qkv_bias": False, "fused": True},
}


def write_tiny_gguf(path: Path, embedded_gguf: Path, types: dict[str, str], tied: bool = True,
                    seed: int = 0, shape: Shape = Shape(), architecture: str = "llama") -> Path:
    """`types`: role (a key of Shape.roles(), or `token_embd`, `output`) -> GGUF type name; roles not named are
    Q4_1, `token_embd` Q8_0. Layer i's roles may be given as `blk.i.ROLE`. `architecture`: a key of FAMILIES."""
    family = FAMILIES[architecture]
    rng = np.random.default_rng(seed)
    tokens, token_types, merges, fields = small_vocabulary(embedded_gguf)
    vocab = len(tokens)
    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(shape.layers)
    writer.add_context_length(512)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    if architecture.startswith("gemma"):
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
        writer.add_sliding_window(4)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        writer.add_string(key, fields[key])
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(fields["bos"])
    writer.add_eos_token_id(fields["eos"])
    writer.add_pad_token_id(fields["padding"])

    def add(name: str, role: str, size: tuple[int, int], default: str, scale: float):
        type_name = types.get(name.removesuffix(".weight"), types.get(role, default))
        data, qtype = tensor_bytes(size, scale, type_name, rng)
        if type_name in ("F32", "F16"):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    def norm(name: str, size: int):
        values = 1 + 0.1 * rng.standard_normal(size)  # as llama.cpp stores Gemma's (1 + w): near 1 either way
        writer.add_tensor(name, values.astype(np.float32))

    add("token_embd.weight", "token_embd", (vocab, shape.hidden), "Q8_0", 1.0)
    for layer in range(shape.layers):
        for role, size in shape.roles(family.get("fused", False)).items():
            add(f"blk.{layer}.{role}.weight", role, size, "Q4_1", size[1] ** -0.5)
            if family["qkv_bias"] and role in ("attn_q", "attn_k", "attn_v"):
                writer.add_tensor(f"blk.{layer}.{role}.bias", (0.1 * rng.standard_normal(size[0])).astype(np.float32))
        for name in ("attn_norm", "ffn_norm") + family["norms"]:
            norm(f"blk.{layer}.{name}.weight", shape.head_dim if name in ("attn_q_norm", "attn_k_norm")
                 else shape.hidden)
    norm("output_norm.weight", shape.hidden)
    if not tied:
        add("output.weight", "output", (vocab, shape.hidden), "Q4_1", shape.hidden ** -0.5)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
