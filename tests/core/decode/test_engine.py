"""The engine against two independent references: the model's own `generate`, and a cache-free recomputation."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, WEIGHT_VARIANTS

from d3cli.core.decode.engine import (
    cache_argument,
    generate,
    generate_steps,
    make_prompt_batch,
    new_cache,
    stream_generate,
)
from d3cli.core.decode.native_step import native_decoder
from d3cli.core.decode.sampling import SamplingSettings, make_sampler
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.core.decode.skipping import SkippedLayer
from d3cli.core.model.model_facts import find_decoder_layers

PROMPTS = [
    [1, 4093, 314, 260, 3575, 282, 4649, 47],
    [1, 9519, 28, 2988, 1694, 2030, 3681, 260, 2115, 23, 2564, 282, 614, 7297, 30],
    [1, 504, 2],
]


def num_layers(model) -> int:
    return model.config.get_text_config(decoder=True).num_hidden_layers


def hf_greedy(model, prompts, max_new_tokens):
    """The model's own generate(do_sample=False) on left-padded prompts, as token lists without padding."""
    batch = make_prompt_batch(prompts, pad_token_id=2, device="cpu")
    attention_mask = batch.attention_mask if batch.attention_mask is not None else torch.ones_like(batch.input_ids)
    output = model.generate(
        input_ids=batch.input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
        do_sample=False, eos_token_id=2, pad_token_id=2,
    )
    replies = []
    for row in output[:, batch.input_ids.shape[1]:].tolist():
        reply = []
        for token in row:
            reply.append(token)
            if token == 2:
                break
        replies.append(reply)
    return replies


def d3_tokens(model, tokenizer, prompts, schedule, max_new_tokens):
    replies = generate(model, tokenizer, prompts, schedule, max_new_tokens=max_new_tokens)
    return [reply.token_ids for reply in replies]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch3"])
def test_full_depth_equals_model_generate(family, prompts, tiny_models, tokenizer):
    model = tiny_models[family]
    expected = hf_greedy(model, prompts, 24)
    alpha_one = DecaySchedule.build(num_layers(model), alpha=1.0, min_layers=2, head=1, tail=1)
    full_floor = DecaySchedule.build(num_layers(model), alpha=0.5, min_layers=num_layers(model), head=1, tail=1)
    assert d3_tokens(model, tokenizer, prompts, alpha_one, 24) == expected
    assert d3_tokens(model, tokenizer, prompts, full_floor, 24) == expected


@pytest.mark.parametrize("variant", sorted(WEIGHT_VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_full_depth_equals_model_generate_with_fused_layers_and_quantized_weights(family, variant,
                                                                                   tiny_variant_models, tokenizer):
    model = tiny_variant_models(family, variant)
    alpha_one = DecaySchedule.build(num_layers(model), alpha=1.0, min_layers=2, head=1, tail=1)
    for prompts in (PROMPTS[:1], PROMPTS):
        assert d3_tokens(model, tokenizer, prompts, alpha_one, 16) == hf_greedy(model, prompts, 16)


@pytest.mark.parametrize("variant", sorted(WEIGHT_VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_recomputation_with_fused_layers_and_quantized_weights(family, variant,
                                                                                       tiny_variant_models):
    """On d3's kernels a model whose layers are all native decodes to the last bit of the recomputation. Others run
    transformers' attention, whose rounding differs between one token and a sequence, and int8 activations turn
    that into differences of ~1e-2 in these chaotic random models: their cache is checked on torch's kernels."""
    model = tiny_variant_models(family, variant)
    if variant != "fused" and native_decoder(model) is None:
        model = tiny_variant_models(family, variant, kernels="torch")
    schedule = DecaySchedule.build(num_layers(model), alpha=0.85, min_layers=2, head=1, tail=1, skip_order="middle")
    assert_cache_matches_recompute(model, PROMPTS[:1], schedule, steps=16)
    assert_cache_matches_recompute(model, PROMPTS, schedule, steps=16)


def test_full_depth_equals_model_generate_on_the_embedded_model(embedded):
    model, tokenizer = embedded.model, embedded.tokenizer
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True)["input_ids"]
        for text in ("What is the capital of France?", "Name three colours of the rainbow, please.")
    ]
    schedule = DecaySchedule.build(30, alpha=1.0)
    for batch in (prompts[:1], prompts):
        assert d3_tokens(model, tokenizer, batch, schedule, 30) == hf_greedy(model, batch, 30)


def recompute_logits(model, batch, generated, schedule):
    """Logits of every step from one forward over the whole sequence, without a cache: at each position whose
    step skipped a layer, that layer's output is replaced by its input."""
    prompt_width = batch.input_ids.shape[1]
    layers = find_decoder_layers(model)
    skipped = torch.zeros(len(layers), prompt_width + generated.shape[1] - 1, dtype=torch.bool)
    for step in range(1, generated.shape[1]):  # generated token step-1 is the input of step `step`
        kept = set(schedule.kept_layers(step))
        for layer in range(len(layers)):
            skipped[layer, prompt_width + step - 1] = layer not in kept

    def replace_skipped(layer_index):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            return torch.where(skipped[layer_index][None, :, None], hidden_in, output)
        return hook

    return forward_without_cache(model, batch, generated, replace_skipped)


def forward_without_cache(model, batch, generated, hook_for):
    """The logits of every step (the prompt's last position on) from one cache-free forward over the prompt and the
    generated tokens, with `hook_for(layer_index)` as a forward hook on each decoder layer."""
    input_ids = torch.cat([batch.input_ids, generated[:, :-1]], dim=1)
    mask = batch.attention_mask
    if mask is None:
        mask = torch.ones_like(batch.input_ids)
    mask = torch.cat([mask, torch.ones_like(generated[:, :-1])], dim=1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    layers = find_decoder_layers(model)
    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits[:, batch.input_ids.shape[1] - 1:, :].float()


def assert_cache_matches_recompute(model, prompts, schedule, steps, tolerance=1e-4):
    batch = make_prompt_batch(prompts, pad_token_id=2, device="cpu")
    run = list(generate_steps(model, batch, schedule, max_new_tokens=steps, pad_token_id=2))
    assert len({len(step.kept_layers) for step in run}) > 2, "the schedule must actually decay in this test"
    generated = torch.stack([step.token_ids for step in run], dim=1)
    cached = torch.stack([step.logits for step in run], dim=1)
    recomputed = recompute_logits(model, batch, generated, schedule)
    difference = (cached - recomputed).abs().max().item()
    assert difference < tolerance, f"cached D3 logits differ from the recomputation by {difference}"
    assert torch.equal(cached.argmax(-1), recomputed.argmax(-1))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("order", ["middle", "late"])
def test_cached_decoding_equals_recomputation_without_cache(family, order, tiny_models):
    model = tiny_models[family]
    schedule = DecaySchedule.build(num_layers(model), alpha=0.85, min_layers=2, head=1, tail=1, skip_order=order)
    assert_cache_matches_recompute(model, PROMPTS[:1], schedule, steps=20)
    assert_cache_matches_recompute(model, PROMPTS, schedule, steps=20)


def test_cached_decoding_equals_recomputation_on_the_embedded_model(embedded):
    """In float64 the two paths agree to the last float32 bit, well inside 1e-4. In float32 the embedded model's
    30 layers put both paths' rounding at ~6e-5 with no skipping at all (logits of size ~35), and at up to ~2.5e-4
    with skipping, so float32 is held to 1e-3 and the same argmax: a wrong cache moves logits by whole units."""
    import copy

    schedule = DecaySchedule.build(30, alpha=0.9, min_layers=6, head=2, tail=2)
    assert_cache_matches_recompute(embedded.model, PROMPTS[:2], schedule, steps=24, tolerance=1e-3)
    float64_model = copy.deepcopy(embedded.model).double()
    assert_cache_matches_recompute(float64_model, PROMPTS[:2], schedule, steps=24, tolerance=1e-4)


@pytest.mark.embedded
def test_full_depth_equals_model_generate_on_the_embedded_model_with_its_files_blocks():
    from d3cli.core.model.loader import load

    embedded_default = load(None)  # the file's own precision: int4, bfloat16 activations
    assert embedded_default.weights.kind == "int4"
    model, tokenizer = embedded_default.model, embedded_default.tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True)["input_ids"]
               for text in ("What is the capital of France?", "Name three colours of the rainbow, please.")]
    schedule = DecaySchedule.build(30, alpha=1.0)
    for batch in (prompts[:1], prompts):
        assert d3_tokens(model, tokenizer, batch, schedule, 24) == hf_greedy(model, batch, 24)


@pytest.mark.embedded
def test_cached_decoding_equals_recomputation_on_the_embedded_model_with_its_files_blocks():
    from d3cli.core.model.loader import load

    model = load(None, weights="int4", dtype="float32").model
    schedule = DecaySchedule.build(30, alpha=0.9, min_layers=6, head=2, tail=2)
    assert_cache_matches_recompute(model, PROMPTS[:2], schedule, steps=20, tolerance=1e-3)


def test_the_skip_really_happens_and_the_model_is_restored(tiny_models, tokenizer):
    model = tiny_models["llama"]
    layers = find_decoder_layers(model)
    original = list(layers)
    calls = [0] * len(layers)
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(layers)]
    schedule = DecaySchedule.build(8, alpha=0.5, min_layers=2, head=1, tail=1, skip_order="late")
    try:
        generate(model, tokenizer, PROMPTS[:1], schedule, max_new_tokens=6)
    finally:
        for handle in handles:
            handle.remove()
    steps_run = [sum(1 for step in range(6) if i in schedule.kept_layers(step)) for i in range(8)]
    assert calls == steps_run  # prefill is step 0; each later step runs only its kept layers
    assert list(layers) == original


def test_events_carry_layers_text_and_finish_reason(tiny_models, tokenizer):
    model = tiny_models["qwen2"]
    schedule = DecaySchedule.build(8, alpha=0.8, min_layers=3, head=1, tail=1)
    events = list(stream_generate(model, tokenizer, PROMPTS[:1], schedule, max_new_tokens=12))
    assert [event.index for event in events] == list(range(len(events)))
    assert [event.layers for event in events] == [schedule.layers_at(i) for i in range(len(events))]
    assert events[0].layers == 8
    assert events[-1].finish_reason in ("eos", "length")
    assert all(event.finish_reason is None for event in events[:-1])
    token_ids = [event.token_id for event in events]
    assert "".join(event.text for event in events) == tokenizer.decode(token_ids, skip_special_tokens=True)


def test_each_row_stops_on_its_own(tiny_models, tokenizer):
    model = tiny_models["llama"]
    schedule = DecaySchedule.build(8, alpha=0.9, min_layers=3, head=1, tail=1)
    free = generate(model, tokenizer, PROMPTS[:2], schedule, max_new_tokens=10)
    # force row 0 to stop early by making its 3rd token an EOS id
    eos = frozenset({free[0].token_ids[2]})
    events = list(stream_generate(model, tokenizer, PROMPTS[:2], schedule, max_new_tokens=10, eos_ids=eos))
    rows = {row: [e for e in events if e.row == row] for row in (0, 1)}
    assert len(rows[0]) == 3 and rows[0][-1].finish_reason == "eos"
    assert [e.token_id for e in rows[1]][:3] == free[1].token_ids[:3]
    assert all(e.finish_reason is None for e in rows[1][:-1])


def test_stop_strings_end_the_text_before_them(tiny_models, tokenizer):
    model = tiny_models["llama"]
    schedule = DecaySchedule.build(8, alpha=1.0, min_layers=2, head=1, tail=1)
    (free,) = generate(model, tokenizer, PROMPTS[:1], schedule, max_new_tokens=16)
    stop = free.text[len(free.text) // 2:][:3]
    assert stop.strip(), "the tiny model's text must give a usable stop string"
    (stopped,) = generate(model, tokenizer, PROMPTS[:1], schedule, max_new_tokens=16, stop_strings=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]
    assert stop not in stopped.text


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(tiny_models, tokenizer):
    model = tiny_models["llama"]
    schedule = DecaySchedule.build(8, alpha=0.9, min_layers=3, head=1, tail=1)
    settings = SamplingSettings(temperature=1.5, top_k=50, top_p=0.95, seed=7)
    first = generate(model, tokenizer, PROMPTS[:2], schedule, sampler=make_sampler(settings), max_new_tokens=16)
    again = generate(model, tokenizer, PROMPTS[:2], schedule, sampler=make_sampler(settings), max_new_tokens=16)
    greedy = generate(model, tokenizer, PROMPTS[:2], schedule, max_new_tokens=16)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert [r.token_ids for r in first] != [r.token_ids for r in greedy]


def test_a_schedule_for_another_depth_is_refused(tiny_models):
    model = tiny_models["llama"]
    batch = make_prompt_batch(PROMPTS[:1], 2, "cpu")
    with pytest.raises(ValueError, match="schedule is for 12 layers"):
        next(generate_steps(model, batch, DecaySchedule.build(12, alpha=0.9, min_layers=2, head=1, tail=1)))


def test_interrupt_keeps_the_partial_replies(tiny_models, tokenizer):
    from d3cli.core.decode.engine import GenerationInterrupted

    model = tiny_models["llama"]
    schedule = DecaySchedule.build(8, alpha=0.9, min_layers=3, head=1, tail=1)
    seen = []

    def interrupt_at_five(event):
        seen.append(event)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(GenerationInterrupted) as stopped:
        generate(model, tokenizer, PROMPTS[:1], schedule, max_new_tokens=50, on_event=interrupt_at_five)
    (reply,) = stopped.value.replies
    assert reply.finish_reason == "interrupted"
    assert reply.token_ids == [event.token_id for event in seen]
    assert not any(isinstance(layer, SkippedLayer) for layer in find_decoder_layers(model))


def test_the_cache_goes_under_the_name_the_model_takes():
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns); older releases take only the old."""
    class Renamed(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    class Older(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    held = object()
    assert cache_argument(Renamed(), held) == {"cache": held}
    assert cache_argument(Older(), held) == {"past_key_values": held}


def test_decode_takes_the_plan_and_keeps_every_reply_inside_the_context(tiny_models, tokenizer):
    from d3cli.core.decode.engine import decode
    from d3cli.core.model.loader import LoadedModel
    from d3cli.core.session.plan import plan_for
    from d3cli.core.session.settings import DecodeSettings

    model = tiny_models["llama"]  # a 512-position context
    loaded = LoadedModel(model, tokenizer, "tiny")
    settings = DecodeSettings(alpha=0.9, min_layers=3, head=1, tail=1, skip_order="middle", max_new_tokens=20)
    plan = plan_for(loaded, settings)
    schedule = plan.schedule
    assert schedule == DecaySchedule.build(num_layers(model), alpha=0.9, min_layers=3, head=1, tail=1)
    assert plan.context == 512 and plan.schedule_source == "option"
    long_prompt, short_prompt = list(range(1, 509)), [1, 4093, 314]
    (clamped, short) = decode(loaded, [long_prompt, short_prompt], plan)
    assert clamped.generated_tokens == short.generated_tokens == 4  # 512 - 508: the longest prompt sets the room
    (alone,) = decode(loaded, [short_prompt], plan)
    assert alone.generated_tokens == 20
    assert alone.token_ids == generate(model, tokenizer, [short_prompt], schedule, max_new_tokens=20)[0].token_ids
    sampled = plan.with_settings(max_new_tokens=12, sampling=SamplingSettings(temperature=1.0, seed=1))
    first, again = (decode(loaded, [short_prompt], sampled, seed=7)[0] for _ in range(2))
    assert first.token_ids == again.token_ids  # the seed given wins, the same each time
    assert first.token_ids != decode(loaded, [short_prompt], sampled, seed=8)[0].token_ids


def test_new_cache_asks_the_model_first(tiny_models):
    from d3cli.core.model.kv_buffers import OwnCache

    class OwnModel:
        def new_cache(self):
            return OwnCache(2)

    assert isinstance(new_cache(OwnModel()), OwnCache)
    from d3cli.core.decode.kv_cache import DepthDecayCache

    assert isinstance(new_cache(tiny_models["llama"]), DepthDecayCache)
