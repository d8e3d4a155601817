"""What d3 reads off a loaded model, in one place: its decoder layers, their count, its context length, where it
runs and in what dtype, and its first embedding rows (however the table is stored)."""

from __future__ import annotations

import torch
from torch import nn

from d3cli.base.errors import UserError


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (`model.model.layers` for Llama, Qwen2, Gemma, Phi-3, Mistral...)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config(decoder=True) if config is not None else None
    num_layers = getattr(text_config, "num_hidden_layers", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and (num_layers is None or len(layers) == num_layers):
        return layers
    candidates = [
        module
        for _, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and num_layers is not None and len(module) == num_layers
    ]
    if len(candidates) == 1:
        return candidates[0]
    raise UserError(
        f"cannot find the decoder layers of {type(model).__name__}: d3 supports decoder-only models whose layers "
        "form one list (Llama, Mistral, Qwen2/2.5/3, Gemma 2/3, Phi-3 and their relatives)"
    )


def context_length(model) -> int | None:
    """How many positions the model was trained for, when its config says."""
    text_config = model.config.get_text_config(decoder=True)
    length = getattr(text_config, "max_position_embeddings", None)
    return int(length) if length else None


def num_decoder_layers(model) -> int:
    return int(model.config.get_text_config(decoder=True).num_hidden_layers)


def embedding_rows(model, count: int):
    """The first `count` rows of the input embedding table in float32, however the table is stored."""
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight[:count].detach().float()
    rows = min(count, embedding.num_embeddings)
    return embedding.rows(torch.arange(rows))


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first weights are (its embedding may hold its table outside parameters when quantized)."""
    return next(model.parameters()).device


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: that of its float parameters (quantized weights keep theirs elsewhere)."""
    return next(parameter.dtype for parameter in model.parameters() if parameter.is_floating_point())
