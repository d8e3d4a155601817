"""Choosing the weights (--weights with --dtype, device and file) and putting them into a model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES

from d3cli import kernels
from d3cli.base.errors import UserError
from d3cli.core.model import fused_layers
from d3cli.core.model.loader import resolve_dtype
from d3cli.core.model.model_facts import find_decoder_layers
from d3cli.core.model.quantized import Int4Linear, Int8Linear
from d3cli.core.model.weight_choice import FILE_KIND, WeightChoice, quantized_dtype, resolve_weights
from d3cli.core.model.weights import apply_weights

CPU, GPU = torch.device("cpu"), torch.device("cuda")
Q4_FILE = {"model.layers.0.mlp.up_proj.weight": "Q4_1", "model.norm.weight": "F32"}
F16_FILE = {"model.layers.0.mlp.up_proj.weight": "F16"}


def choose(weights="auto", dtype="auto", device=CPU, types=None, device_map=None, group_size=32):
    return resolve_weights(weights, dtype, device, gguf_types=types, device_map=device_map, group_size=group_size,
                           default_dtype=lambda dtype, device: torch.float32 if dtype == "auto"
                           else getattr(torch, dtype))


def test_auto_runs_a_quantized_file_in_its_precision_on_the_cpu_and_everything_else_dense():
    assert choose(types=Q4_FILE) == WeightChoice(FILE_KIND, quantized_dtype(), why="the GGUF file's own precision")
    assert choose(types=F16_FILE).kind == "float32"
    assert choose().kind == "float32"  # a float model stays float32 unless asked
    assert choose(types=Q4_FILE, dtype="float32").kind == "float32"  # --dtype alone keeps its old meaning
    on_gpu = choose(types=Q4_FILE, device=GPU)
    assert not on_gpu.quantized and "only on the CPU" in on_gpu.why
    assert not choose(types=Q4_FILE, device_map="auto").quantized


def test_asked_kinds_and_their_activations():
    assert choose("int4") == WeightChoice("int4", quantized_dtype(), 32, why="asked for")
    assert choose("int8", "float32").dtype == torch.float32
    assert choose("int4", group_size=128).group_size == 128
    assert choose("bfloat16") == WeightChoice("bfloat16", torch.bfloat16, why="asked for")
    assert choose("float32", "float32").kind == "float32"


def test_quantized_weights_run_float32_activations_on_d3s_kernels_and_bfloat16_on_torchs():
    """d3's kernels quantize activations per block themselves; torch's are fast only with bfloat16 ones."""
    with kernels.turned_off():
        assert choose("int4").dtype == torch.bfloat16 and choose(types=Q4_FILE).dtype == torch.bfloat16
    if kernels.available():
        assert choose("int4").dtype == torch.float32 and choose(types=Q4_FILE).dtype == torch.float32


@pytest.mark.parametrize("arguments, fragment", [
    (dict(weights="int4", device=GPU), "CPU kernels"),
    (dict(weights="int8", device_map="auto"), "--device-map"),
    (dict(weights="int4", dtype="float16"), "float16"),
    (dict(weights="float32", dtype="bfloat16"), "give one of them"),
    (dict(weights="int4", group_size=48), "--group-size"),
])
def test_what_cannot_run_is_a_user_error(arguments, fragment):
    with pytest.raises(UserError, match=fragment):
        choose(**arguments)


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


def test_the_loaders_dtype_rule_is_what_auto_falls_back_to():
    assert resolve_dtype("auto", CPU) == torch.float32
