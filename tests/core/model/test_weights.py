"""Putting a weights choice into a model: quantized linear layers, fused decoder layers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES

from d3cli.core.model import fused_layers
from d3cli.core.model.model_facts import find_decoder_layers
from d3cli.core.model.quantized import Int4Linear, Int8Linear
from d3cli.core.model.weight_choice import WeightChoice
from d3cli.core.model.weights import apply_weights


@pytest.mark.parametrize("family", FAMILIES)
def test_quantizing_on_load_replaces_every_linear_layer_and_fuses_supported_layers(family, tiny_models):
    model = copy.deepcopy(tiny_models[family])
    report = apply_weights(model, WeightChoice("int4", torch.bfloat16))
    layers = find_decoder_layers(model)
    fused = all(isinstance(layer, fused_layers.FusedDecoderLayer) for layer in layers)
    assert fused == (family in ("llama", "mistral", "qwen2", "qwen3"))
    assert not [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    assert report.kind == "int4" and report.head_kind == "int8" and report.dtype == "bfloat16"
    linears_per_layer = 7 if family != "phi3" else 4  # phi3 stores qkv and gate/up fused already
    assert report.modules == {"int4": len(layers) * linears_per_layer, "int8": 1}
    assert report.sources == {"quantized to int4 on load": len(layers) * linears_per_layer,
                              "quantized to int8 on load": 1}
    kinds = {type(module) for module in model.modules()} & {Int4Linear, Int8Linear}
    assert kinds == {Int4Linear, Int8Linear}
    dense = tiny_models[family]
    dense_bytes = sum(p.numel() * p.element_size() for layer in find_decoder_layers(dense) for p in
                      layer.parameters())
    assert sum(report.layer_bytes) < dense_bytes / 4


def test_dense_weights_are_fused_without_changing_a_value(tiny_models):
    model = copy.deepcopy(tiny_models["qwen2"])  # biased q/k/v projections, sliding-window layers
    apply_weights(model, WeightChoice("float32", torch.float32))
    ids = torch.tensor([[1, 4093, 314, 260, 3575, 282, 4649, 47, 9519, 28, 2988]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, tiny_models["qwen2"](ids).logits)


def test_without_fusing_the_models_own_layers_stay(tiny_models):
    model = copy.deepcopy(tiny_models["llama"])
    apply_weights(model, WeightChoice("int8", torch.float32), fuse=False)
    assert type(find_decoder_layers(model)[0]).__name__ == "LlamaDecoderLayer"
    assert isinstance(find_decoder_layers(model)[0].self_attn.q_proj, Int8Linear)
