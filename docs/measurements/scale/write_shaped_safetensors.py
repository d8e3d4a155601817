#!/usr/bin/env python3
"""Write a Hugging Face folder of a real model's shape with random bfloat16 weights in safetensors shards, for
timing and memory measurements of `--model FOLDER` (never for quality): config.json, the embedded model's tokenizer
(49k tokens), and model-0000N-of-0000M.safetensors with their index.

    python docs/measurements/scale/write_shaped_safetensors.py --shape llama2-7b OUT_FOLDER

Shapes: llama2-7b (32 layers, hidden 4096, FFN 11008, 32 heads), 3b (26, 3200, 8640, 32), 1b (22, 2048, 5632,
32 heads, 4 KV heads). Each tensor is made and written shard by shard, so memory stays about one shard.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {"llama2-7b": (32, 4096, 11008, 32, 32), "3b": (26, 3200, 8640, 32, 32), "1b": (22, 2048, 5632, 32, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    options = parser.parse_args()
    layers, hidden, ffn, heads, kv_heads = SHAPES[options.shape]
    from transformers import AutoTokenizer, LlamaConfig

    from d3cli.core.model.gguf_cache import cached_gguf_dir
    from d3cli.core.model.loader import embedded_gguf_path

    tokenizer = AutoTokenizer.from_pretrained(cached_gguf_dir(embedded_gguf_path()))
    vocab = len(tokenizer)
    options.out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         tie_word_embeddings=False, dtype="bfloat16", bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    config.save_pretrained(options.out)
    tokenizer.save_pretrained(options.out)
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        base = f"model.layers.{i}"
        shapes.update({f"{base}.self_attn.q_proj.weight": (heads * head_dim, hidden),
                       f"{base}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                       f"{base}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                       f"{base}.self_attn.o_proj.weight": (hidden, heads * head_dim),
                       f"{base}.mlp.gate_proj.weight": (ffn, hidden), f"{base}.mlp.up_proj.weight": (ffn, hidden),
                       f"{base}.mlp.down_proj.weight": (hidden, ffn),
                       f"{base}.input_layernorm.weight": (hidden,), f"{base}.post_attention_layernorm.weight": (hidden,)})
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        current[name] = shape
        size += torch.Size(shape).numel() * 2
        if size > options.shard_gb * 1e9:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard.items():
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * shape[1] ** -0.5).to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, str(options.out / file), metadata={"format": "pt"})
        del tensors
    (options.out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                         indent=2))


if __name__ == "__main__":
    main()
