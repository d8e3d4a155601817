"""d3's decoder-layer kernel inside the model (native_layer.py): the same layer as the fused Python one, and a
prefill plus decode steps giving the whole-sequence forward to the last bit (the decode step alone:
test_native_step.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_SIZES
from native_models import PROMPT, tiny

from d3cli import kernels
from d3cli.core.decode.engine import generate_steps, make_prompt_batch
from d3cli.core.decode.native_step import native_decoder
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.core.model.model_facts import find_decoder_layers
from d3cli.core.model.native_layer import NativeLayer
from d3cli.core.model.weight_choice import FILE_KIND, WeightChoice
from d3cli.core.model.weights import apply_weights

pytestmark = [pytest.mark.skipif(not kernels.available(), reason=f"d3's kernels: {kernels.load()}"),
              pytest.mark.usefixtures("thread_team")]

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]  # qwen2: biased q/k/v; qwen3: per-head q/k norms


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_every_layer_runs_as_one_kernel_call(family, kind):
    model = tiny(family, kind)
    assert all(isinstance(layer.native, NativeLayer) for layer in find_decoder_layers(model))
    assert native_decoder(model) is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_the_kernel_computes_the_fused_layer(family):
    """The same layer as the Python one over the same int8-activation products: float rounding differs in norms,
    attention and SiLU, which can move an activation across a rounding step, so the two agree to ~1e-3."""
    model = tiny(family)
    layer = find_decoder_layers(model)[2]
    hidden = torch.randn(2, 7, TINY_SIZES["hidden_size"])
    positions = torch.arange(7)[None].expand(2, -1)
    embeddings = model.model.rotary_emb(hidden, positions)
    with torch.inference_mode():
        native = layer(hidden, position_embeddings=embeddings)
        saved, layer.native = layer.native, None
        python = layer(hidden, position_embeddings=embeddings)
        layer.native = saved
    assert native.shape == python.shape
    assert (native - python).abs().max() < 2e-3 * python.abs().max()


def logits_of_steps(model, prompts, steps, schedule=None):
    schedule = schedule or DecaySchedule.full(len(find_decoder_layers(model)))
    batch = make_prompt_batch(prompts, pad_token_id=2, device="cpu")
    run = list(generate_steps(model, batch, schedule, max_new_tokens=steps, pad_token_id=2))
    return torch.stack([step.token_ids for step in run], 1), torch.stack([step.logits for step in run], 1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompts", [[PROMPT], [PROMPT, PROMPT[:4], PROMPT[:9]]], ids=["one", "padded"])
def test_a_prefill_and_decode_steps_are_the_whole_sequence_forward_to_the_last_bit(family, prompts):
    """Also for left-padded rows, whose queries see fewer positions than the sequence holds: a query's attention
    is the same whether later (masked) positions exist or not."""
    model = tiny(family)
    tokens, logits = logits_of_steps(model, prompts, 20)
    batch = make_prompt_batch(prompts, pad_token_id=2, device="cpu")
    sequence = torch.cat([batch.input_ids, tokens[:, :-1]], dim=1)
    mask = torch.ones_like(sequence)
    if batch.attention_mask is not None:
        mask[:, : batch.input_ids.shape[1]] = batch.attention_mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.inference_mode():
        whole = model(sequence, attention_mask=mask, position_ids=positions, use_cache=False).logits
    assert torch.equal(logits, whole[:, batch.input_ids.shape[1] - 1 :].float())


def test_a_padded_batch_decodes_as_its_rows_alone():
    """The mask reaches the kernel: each row of a left-padded batch gives its own tokens (its logits to float
    rounding: the padding shifts where the attention's chunks of positions start)."""
    model = tiny("llama")
    prompts = [PROMPT, PROMPT[:4]]
    tokens, logits = logits_of_steps(model, prompts, 10)
    for row, prompt in enumerate(prompts):
        alone_tokens, alone_logits = logits_of_steps(model, [prompt], 10)
        assert torch.equal(tokens[row], alone_tokens[0])
        torch.testing.assert_close(logits[row], alone_logits[0], rtol=1e-3, atol=1e-3)


def test_layers_the_kernel_does_not_take_run_in_python():
    model = tiny("llama", "float32")  # dense weights: the fused Python layer
    assert all(layer.native is None for layer in find_decoder_layers(model))
    assert native_decoder(model) is None
    windowed = tiny("mistral", "int4")
    assert native_decoder(windowed) is not None
    import transformers

    config = transformers.MistralConfig(**TINY_SIZES, vocab_size=10000, num_hidden_layers=2, sliding_window=6)
    sliding = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    apply_weights(sliding, WeightChoice("int4", torch.float32))
    assert all(layer.native is None for layer in find_decoder_layers(sliding))  # sliding windows: Python


def test_a_layer_whose_projections_differ_in_kind_is_still_one_call():
    """Q4_K_M files store some v_proj in Q6_K (int8 here): the kernel takes the projection as two parts."""
    mixed = tiny("llama", None)
    types = {f"model.layers.{index}.self_attn.{name}.weight": ("Q6_K" if name == "v_proj" else "Q4_1")
             for index in range(6) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    types.update({f"model.layers.{index}.mlp.{name}.weight": "Q4_1" for index in range(6)
                  for name in ("gate_proj", "up_proj", "down_proj")})
    types["lm_head.weight"] = "Q8_0"  # a float head's product would depend on the number of rows (BLAS)
    apply_weights(mixed, WeightChoice(FILE_KIND, torch.float32), gguf_types=types)
    layer = find_decoder_layers(mixed)[0]
    assert [part.kind for part in layer.qkv] == ["int4", "int8"] and layer.native is not None
    tokens, logits = logits_of_steps(mixed, [PROMPT], 8)
    sequence = torch.cat([torch.tensor([PROMPT]), tokens[:, :-1]], dim=1)
    with torch.inference_mode():
        assert torch.equal(logits, mixed(sequence, use_cache=False).logits[:, len(PROMPT) - 1 :].float())


def test_a_copy_of_the_model_runs_natively_too():
    model = tiny("llama")
    twin = copy.deepcopy(model)
    assert native_decoder(twin) is not None and native_decoder(twin) is not native_decoder(model)
    tokens, logits = logits_of_steps(model, [PROMPT], 6)
    twin_tokens, twin_logits = logits_of_steps(twin, [PROMPT], 6)
    assert torch.equal(logits, twin_logits)


@pytest.mark.parametrize("head_dim", [20, 100])  # whole vectors and a tail: 1 + 4 and 6 + 4 on AVX-512, 2 + 4 and 12 + 4
def test_heads_the_vectors_do_not_divide_take_the_vector_path_with_a_tail(head_dim):  # on AVX2 (a 3B head of 100)
    """The kernel's attention for such heads against the Python layer, and its prefill and decode steps against the
    whole-sequence forward to the last bit."""
    model = tiny("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim)
    layers = find_decoder_layers(model)
    assert all(isinstance(layer.native, NativeLayer) for layer in layers)
    hidden = torch.randn(2, 70, TINY_SIZES["hidden_size"])  # past one 64-position chunk
    positions = torch.arange(70)[None].expand(2, -1)
    embeddings = model.model.rotary_emb(hidden, positions)
    with torch.inference_mode():
        native = layers[2](hidden, position_embeddings=embeddings)
        saved, layers[2].native = layers[2].native, None
        python = layers[2](hidden, position_embeddings=embeddings)
        layers[2].native = saved
    assert (native - python).abs().max() < 2e-3 * python.abs().max()
    prompts = [PROMPT, PROMPT[:4]]
    tokens, logits = logits_of_steps(model, prompts, 12)
    batch = make_prompt_batch(prompts, pad_token_id=2, device="cpu")
    sequence = torch.cat([batch.input_ids, tokens[:, :-1]], dim=1)
    mask = torch.ones_like(sequence)
    mask[:, : batch.input_ids.shape[1]] = batch.attention_mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.inference_mode():
        whole = model(sequence, attention_mask=mask, position_ids=positions, use_cache=False).logits
    assert torch.equal(logits, whole[:, batch.input_ids.shape[1] - 1 :].float())
