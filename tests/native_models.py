"""Tiny models whose decoder layers run on d3's kernels, for the native layer and native step tests."""

import torch
from conftest import TINY_SIZES

from d3cli.core.model.weight_choice import WeightChoice
from d3cli.core.model.weights import apply_weights

PROMPT = [1, 4093, 314, 260, 3575, 282, 4649, 47, 9519, 28, 2988]


def tiny(family: str, kind: str | None = "int4", vocab_size: int = 10000, seed: int = 0, **config_options):
    """A tiny model of `family` whose weights are `kind` on d3's kernels (None: transformers' model as it is), with
    full attention (no sliding windows)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(TINY_SIZES, vocab_size=vocab_size, num_hidden_layers=6, max_position_embeddings=512,
                  initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=2, **config_options)
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
              "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}[family](**common)
    if family == "mistral":
        config.sliding_window = None
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if kind is not None:
        apply_weights(model, WeightChoice(kind, torch.float32))
    return model
