"""d3's own model against transformers' model built from the same GGUF file: the same masks, logits, replies and
layer counts, for every family it builds; and a lean start that never imports transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from gguf_files import Shape, write_tiny_gguf

from d3cli import kernels
from d3cli.core.decode import engine
from d3cli.core.decode.engine import new_cache
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.core.model import d3_record, gguf_cache, loader
from d3cli.core.model.d3_model import D3ForCausalLM, causal_mask
from d3cli.core.model.kv_buffers import OwnCache

pytestmark = pytest.mark.skipif(not kernels.available(), reason="d3's own model runs where d3's kernels do")

PROMPTS = [[1, 504, 314, 260, 1694, 23, 282, 614, 30], [260, 2030, 1000, 17], [99, 1200, 7, 8, 9, 10, 11]]
SHAPE = Shape(layers=6)


def shape_of(family: str) -> Shape:
    return Shape(layers=6, heads=2, kv_heads=1) if family == "qwen3" else SHAPE  # transformers reads Qwen3's
    # head_dim as its default, 128


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def family_file(request, tmp_path_factory):
    """A six-layer file of the family, loaded once through transformers (which records its start)."""
    path = write_tiny_gguf(tmp_path_factory.mktemp(request.param) / f"{request.param}.gguf",
                           loader.embedded_gguf_path(), {}, shape=shape_of(request.param),
                           architecture=request.param)
    return path, loader.load(str(path), device="cpu")


def test_a_transformers_start_records_what_a_lean_start_needs(family_file):
    path, reference = family_file
    folder = gguf_cache.cached_gguf_dir(path)
    record = d3_record.read(folder)
    assert record is not None and "unsupported" not in record
    assert record["model_class"] == type(reference.model).__name__
    assert torch.equal(torch.tensor(record["inv_freq"]), reference.model.model.rotary_emb.inv_freq.float())
    if record["model_class"] == "LlamaForCausalLM":  # llama.cpp's rotary row order, undone for q and k
        assert isinstance(record["tensors"]["blk.0.attn_q.weight"], int)
    assert record["tensors"]["blk.0.ffn_down.weight"] == "keeps"


def test_the_lean_start_builds_d3s_own_model_with_the_same_weights(family_file):
    path, reference = family_file
    lean = loader.load(str(path), device="cpu", lean=True)
    assert isinstance(lean.model, D3ForCausalLM)
    assert lean.weights.label() == reference.weights.label()
    assert isinstance(new_cache(lean.model), OwnCache)
    assert engine.eos_token_ids(lean.model, lean.tokenizer) == engine.eos_token_ids(reference.model,
                                                                                   reference.tokenizer)


@pytest.mark.parametrize("alpha", [1.0, 0.8])
def test_d3s_own_model_decodes_what_transformers_model_decodes(family_file, alpha):
    """A padded batch, prefill and every step: the same logits, tokens and layers, at full depth and under D3."""
    path, reference = family_file
    lean = loader.load(str(path), device="cpu", lean=True)
    schedule = DecaySchedule.build(SHAPE.layers, alpha=alpha, min_layers=3, head=1, tail=1, skip_order="middle")
    steps = []
    for loaded in (reference, lean):
        batch = engine.make_prompt_batch(PROMPTS, 0, "cpu")
        steps.append(list(engine.generate_steps(loaded.model, batch, schedule, max_new_tokens=6)))
    for theirs, ours in zip(*steps):
        assert ours.kept_layers == theirs.kept_layers
        assert torch.equal(ours.token_ids, theirs.token_ids)
        torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-5)


def test_a_continued_chat_reuses_the_own_cache_as_transformers_cache(family_file):
    """A second prompt after a first reply (past > 0, several new tokens: an explicit causal mask)."""
    path, reference = family_file
    lean = loader.load(str(path), device="cpu", lean=True)
    schedule = DecaySchedule.full(SHAPE.layers)
    replies = []
    for loaded in (reference, lean):
        cache = new_cache(loaded.model)
        first = engine.generate(loaded.model, loaded.tokenizer, [PROMPTS[0]], schedule, max_new_tokens=4,
                                cache=cache)[0]
        held = cache.held_by_every_layer()
        assert cache.crop_to(held)
        second = engine.generate(loaded.model, loaded.tokenizer, [PROMPTS[1]], schedule, max_new_tokens=4,
                                 cache=cache, past_length=held)[0]
        replies.append((first.token_ids, second.token_ids))
    assert replies[0] == replies[1]


@pytest.mark.parametrize("past,tokens,padded", [(0, 5, False), (0, 5, True), (0, 1, False), (4, 1, False),
                                                (4, 1, True), (4, 3, False), (4, 3, True)])
def test_the_mask_is_transformers_sdpa_mask(past, tokens, padded):
    from transformers import DynamicCache, LlamaConfig
    from transformers.masking_utils import create_causal_mask

    config = LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1,
                         intermediate_size=32, vocab_size=64)
    config._attn_implementation = "sdpa"
    cache = DynamicCache(config=config)
    if past:
        cache.update(torch.zeros(2, 2, past, 8), torch.zeros(2, 2, past, 8), 0)
    attention = torch.ones(2, past + tokens, dtype=torch.long)
    if padded:
        attention[1, :2] = 0
    positions = torch.arange(past, past + tokens)[None].expand(2, -1)
    theirs = create_causal_mask(config=config, inputs_embeds=torch.zeros(2, tokens, 16),
                                attention_mask=attention if padded else None, cache=cache, position_ids=positions)
    ours = causal_mask(attention if padded else None, 2, tokens, past, torch.device("cpu"))
    if theirs is None:
        assert ours is None
    else:
        assert ours is not None and torch.equal(ours.expand(2, 1, -1, -1), theirs.expand(2, 1, -1, -1))


def test_float_weights_and_non_lean_loads_keep_transformers_model(family_file):
    path, _ = family_file
    assert not isinstance(loader.load(str(path), device="cpu", weights="float32", lean=True).model, D3ForCausalLM)
    assert not isinstance(loader.load(str(path), device="cpu").model, D3ForCausalLM)


def test_a_lean_start_of_the_embedded_model_never_imports_transformers(embedded):
    """The warm start of `d3 generate`: no transformers module in the process, and the reply of the transformers
    path (the conftest's `embedded` load recorded the start)."""
    script = ("import sys, json\n"
              "from d3cli.core.decode import engine\n"
              "from d3cli.core.model import loader\n"
              "from d3cli.core.text.prompts import encode_prompt\n"
              "from d3cli.core.decode.schedule import DecaySchedule\n"
              "loaded = loader.load(None, device='cpu', lean=True)\n"
              "ids = encode_prompt(loaded.tokenizer, 'Name a colour.')\n"
              "schedule = DecaySchedule.full(30)\n"
              "reply = engine.generate(loaded.model, loaded.tokenizer, [ids], schedule, max_new_tokens=8)[0]\n"
              "print(json.dumps({'model': type(loaded.model).__name__, 'ids': ids, 'reply': reply.token_ids,\n"
              "                  'transformers': sorted(m for m in sys.modules if m.startswith('transformers'))}))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["model"] == "D3ForCausalLM" and seen["transformers"] == []
    from d3cli.core.text.prompts import encode_prompt

    reference = loader.load(None, device="cpu")
    ids = encode_prompt(reference.tokenizer, "Name a colour.")
    schedule = DecaySchedule.full(30)
    assert seen["ids"] == ids
    assert seen["reply"] == engine.generate(reference.model, reference.tokenizer, [ids], schedule,
                                            max_new_tokens=8)[0].token_ids
