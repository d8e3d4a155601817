"""The fused decoder layer against transformers' own layer, on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES

from d3cli import kernels
from d3cli.core.decode.engine import generate_steps, make_prompt_batch
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.core.model import fused_layers
from d3cli.core.model.model_facts import find_decoder_layers
from d3cli.core.model.weight_choice import FILE_KIND, WeightChoice
from d3cli.core.model.weights import apply_weights

pytestmark = pytest.mark.usefixtures("thread_team")  # the kernels' threads split the work

SUPPORTED = ["llama", "mistral", "qwen2", "qwen3"]
PROMPTS = [[1, 4093, 314, 260, 3575, 282, 4649, 47], [1, 504, 2]]  # the second is padded: a masked batch


@pytest.mark.parametrize("family", FAMILIES)
def test_which_layers_are_supported(family, tiny_models):
    assert fused_layers.supports(find_decoder_layers(tiny_models[family])[0]) == (family in SUPPORTED)


def steps(model, schedule, tokens=14):
    batch = make_prompt_batch(PROMPTS, pad_token_id=2, device="cpu")
    run = list(generate_steps(model, batch, schedule, max_new_tokens=tokens, pad_token_id=2))
    return torch.stack([step.token_ids for step in run], 1), torch.stack([step.logits for step in run], 1)


@pytest.mark.parametrize("family", SUPPORTED)
def test_fused_layers_decode_as_the_models_own_layers(family, tiny_models):
    """Prefill, masked batch decoding (sliding windows exceeded in mistral and qwen2) and D3 skipping: the same
    tokens, and logits to float32 rounding (single-query attention groups its query heads, another kernel)."""
    reference = tiny_models[family]
    fused = copy.deepcopy(reference)
    apply_weights(fused, WeightChoice("float32", torch.float32))
    assert all(isinstance(layer, fused_layers.FusedDecoderLayer) for layer in find_decoder_layers(fused))
    for schedule in (DecaySchedule.full(8), DecaySchedule.build(8, alpha=0.85, min_layers=2, head=1, tail=1)):
        expected_tokens, expected_logits = steps(reference, schedule)
        tokens, logits = steps(fused, schedule)
        assert torch.equal(tokens, expected_tokens)
        torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        assert torch.equal(fused(ids).logits, reference(ids).logits)  # the prefill: the same operations


def test_a_layer_whose_projections_differ_in_kind_runs_them_side_by_side(tiny_models):
    """A GGUF file may store v_proj in another type than q_proj and k_proj (Q4_K_M does): the fused layer then
    runs the int4 q/k product and the int8 v product and joins them. On torch's kernels, so that the fused layers
    and transformers' own compute the same products (d3's kernel: tests/core/model/test_native_layer.py)."""
    types = {f"model.layers.{index}.self_attn.{name}.weight": ("Q6_K" if name == "v_proj" else "Q4_1")
             for index in range(8) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    types.update({f"model.layers.{index}.mlp.{name}.weight": "Q4_1" for index in range(8)
                  for name in ("gate_proj", "up_proj", "down_proj")})
    fused, unfused = copy.deepcopy(tiny_models["llama"]), copy.deepcopy(tiny_models["llama"])
    with kernels.turned_off():
        apply_weights(fused, WeightChoice(FILE_KIND, torch.float32), gguf_types=types)
        apply_weights(unfused, WeightChoice(FILE_KIND, torch.float32), gguf_types=types, fuse=False)
    layer = find_decoder_layers(fused)[0]
    assert [part.kind for part in layer.qkv] == ["int4", "int8"] and len(layer.gate_up) == 1
    schedule = DecaySchedule.full(8)
    tokens, logits = steps(fused, schedule)
    expected_tokens, expected_logits = steps(unfused, schedule)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
