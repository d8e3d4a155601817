"""Choosing the weights (--weights with --dtype, device and file), and the report of what ran."""

from __future__ import annotations

import pytest
import torch

from d3cli import kernels
from d3cli.base.errors import UserError
from d3cli.core.model.loader import resolve_dtype
from d3cli.core.model.weight_choice import (
    FILE_KIND,
    WeightChoice,
    WeightsReport,
    dtype_name,
    quantized_dtype,
    resolve_weights,
)

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


def test_the_loaders_dtype_rule_is_what_auto_falls_back_to():
    assert resolve_dtype("auto", CPU) == torch.float32


def test_a_choice_is_quantized_unless_its_kind_is_dense():
    assert [WeightChoice(kind, torch.float32).quantized for kind in ("float32", "bfloat16", "float16")] == [False] * 3
    assert [WeightChoice(kind, torch.float32).quantized for kind in ("int8", "int4", FILE_KIND)] == [True] * 3
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name(torch.float32) == "float32"


def report(**fields) -> WeightsReport:
    return WeightsReport(**{"kind": "int4", "dtype": "float32", "group_size": 32, "layer_bytes": (100, 300),
                            "head_bytes": 50, "other_bytes": 999, **fields})


def test_a_steps_bytes_are_its_layers_and_the_lm_head_not_the_embeddings():
    assert report().step_bytes == 450
    assert report().step_bytes_at(2) == 450 and report().step_bytes_at(0.5) == 50 + 0.5 * 200
    assert report(layer_bytes=()).step_bytes_at(3) == 50


@pytest.mark.parametrize("fields, label", [
    (dict(kind="bfloat16", dtype="bfloat16"), "bfloat16"),
    (dict(kind="int8", dtype="bfloat16", modules={"int8": 15}, head_kind="int8", group_size=None),
     "int8, bfloat16 activations"),
    (dict(modules={"int4": 14, "int8": 1, "int4 embedding": 1}, head_kind="int8", kernels="d3 kernels (avx2)"),
     "int4 (group 32), LM head int8, float32 activations, d3 kernels (avx2)"),
    (dict(modules={"int4": 12, "int6": 2, "int5": 1, "int8": 1}, head_kind="int8"),
     "int4 (group 32; 1 int5; 2 int6), LM head int8, float32 activations"),
    (dict(kind="int6", modules={"int6": 14, "int8": 1}, head_kind="int6", kernels="torch kernels (int8 mm)"),
     "int6 (1 int8), float32 activations, torch kernels"),
])
def test_the_label_names_the_kind_its_exceptions_the_head_and_the_kernels(fields, label):
    assert report(**fields).label() == label


def test_as_dict_carries_the_label_and_the_step_bytes():
    made = report(modules={"int4": 14, "int8": 1}, sources={"gguf Q4_0": 14}, head_kind="int8", why="asked for")
    assert made.as_dict() == {"kind": "int4", "dtype": "float32", "label": made.label(), "kernels": None,
                              "modules": {"int4": 14, "int8": 1}, "sources": {"gguf Q4_0": 14}, "group_size": 32,
                              "head": "int8", "step_bytes": 450, "why": "asked for"}


def test_auto_says_why_a_quantized_file_runs_dense():
    assert choose(types=Q4_FILE, device_map="auto").why == "--device-map spreads dense weights"
    asked = choose(types=Q4_FILE, dtype="bfloat16")
    assert (asked.kind, asked.dtype, asked.why) == ("bfloat16", torch.bfloat16, "--dtype bfloat16 was asked for")
    assert choose(types=F16_FILE).why == "float weights stay dense" == choose().why
