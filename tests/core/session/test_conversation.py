"""Multi-turn decoding: the cache reused between turns must give exactly what a fresh full-depth prefill gives."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, SLIDING_FAMILIES, build_tiny_model

from d3cli.base.errors import UserError
from d3cli.core.model.loader import LoadedModel
from d3cli.core.session.conversation import Conversation
from d3cli.core.session.settings import DecodeSettings

DECAYING = DecodeSettings(alpha=0.8, min_layers=3, head=1, tail=1, max_new_tokens=12)


class LogitsProbe:
    """Records the last-position logits of every forward pass of the model (after any final soft-capping)."""

    def __init__(self, model):
        self.calls: list[torch.Tensor] = []
        self.handle = model.register_forward_hook(self.record)

    def record(self, module, args, output):
        self.calls.append(output.logits[:, -1, :].detach().float().clone())

    def close(self):
        self.handle.remove()


def first_logits_of_next_turn(conversation: Conversation, user_text: str) -> tuple[torch.Tensor, list[int], int]:
    """The logits the next reply starts from, the conversation's token ids, and how many came from the cache."""
    plan = conversation.plan(user_text)
    probe = LogitsProbe(conversation.loaded.model)
    try:
        conversation.reply(user_text, plan=plan)
    finally:
        probe.close()
    return probe.calls[0], plan.token_ids, plan.reused  # `reused` is 0 if the cache had to start afresh


def fresh_prefill_logits(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([token_ids])).logits[:, -1, :].float()


def assert_turns_start_like_fresh_prefills(conversation: Conversation, expect_reuse: bool) -> None:
    first = conversation.reply("Hello there, how are you?")
    assert min(first.layers_per_token) < conversation.num_layers, "the first reply must decay"
    for user_text in ("Tell me more.", "And then?"):
        logits, token_ids, reused = first_logits_of_next_turn(conversation, user_text)
        if expect_reuse:
            assert reused > 10, "the cache of the previous turns must be reused"
        difference = (logits - fresh_prefill_logits(conversation.loaded.model, token_ids)).abs().max().item()
        assert difference < 1e-4, f"turn starts {difference} away from a fresh full-depth prefill"


@pytest.mark.parametrize("family", FAMILIES)
def test_next_turn_starts_exactly_where_a_fresh_prefill_would(family, tiny_models, tokenizer):
    """With windows of 6 the sliding layers have forgotten too much to crop, so those models start afresh."""
    loaded = LoadedModel(tiny_models[family], tokenizer, family)
    conversation = Conversation(loaded, DECAYING, system="You are brief.")
    assert_turns_start_like_fresh_prefills(conversation, expect_reuse=family not in SLIDING_FAMILIES)


@pytest.mark.parametrize("family", SLIDING_FAMILIES)
def test_sliding_window_layers_are_cropped_while_they_hold_everything(family, tokenizer):
    model = build_tiny_model(family, len(tokenizer), window=400)
    conversation = Conversation(LoadedModel(model, tokenizer, family), DECAYING, system="You are brief.")
    assert_turns_start_like_fresh_prefills(conversation, expect_reuse=True)


def test_reuse_stops_at_the_positions_every_layer_holds(tiny_models, tokenizer):
    loaded = LoadedModel(tiny_models["llama"], tokenizer, "llama")
    conversation = Conversation(loaded, DECAYING)
    first_plan = conversation.plan("Hello there, how are you?")
    reply = conversation.reply("Hello there, how are you?", plan=first_plan)
    assert reply.layers_per_token[1] < 8  # the reply really decayed
    held = conversation.cache.held_by_every_layer()
    # every layer ran the prompt and the first generated token only (step 1 already skips layers)
    assert held == len(first_plan.token_ids)
    plan = conversation.plan("Go on.")
    assert plan.reused == held
    logits, token_ids, _ = first_logits_of_next_turn(conversation, "Go on.")
    assert (logits - fresh_prefill_logits(loaded.model, token_ids)).abs().max().item() < 1e-4


def test_full_depth_chat_matches_model_generate_on_the_growing_conversation(embedded):
    """Three turns at alpha = 1 on the embedded model give the replies of the model's own generate."""
    model, tokenizer = embedded.model, embedded.tokenizer
    settings = DecodeSettings(alpha=1.0, max_new_tokens=40)
    conversation = Conversation(embedded, settings)
    messages: list[dict[str, str]] = []
    for user_text in ("What is the capital of France?", "What is it famous for?", "Name one museum there."):
        messages.append({"role": "user", "content": user_text})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt):]
        expected_text = tokenizer.decode(expected, skip_special_tokens=True)
        reply = conversation.reply(user_text)
        assert reply.token_ids == expected.tolist()
        messages.append({"role": "assistant", "content": expected_text})
    assert conversation.messages == messages


def test_turn_two_logits_on_the_embedded_model_at_decay(embedded):
    conversation = Conversation(embedded, DecodeSettings(alpha=0.9, min_layers=12, max_new_tokens=24))
    conversation.reply("Name three colours.")
    logits, token_ids, reused = first_logits_of_next_turn(conversation, "Which is the warmest?")
    assert reused > 20
    assert (logits - fresh_prefill_logits(embedded.model, token_ids)).abs().max().item() < 1e-4


def test_oldest_turns_are_dropped_to_fit_the_context(tiny_models, tokenizer):
    model = tiny_models["llama"]  # 512 positions
    loaded = LoadedModel(model, tokenizer, "llama")
    conversation = Conversation(loaded, DecodeSettings(alpha=1.0, max_new_tokens=8), system="Stay calm.")
    long_message = "word " * 150
    for _ in range(3):
        conversation.reply(long_message)
    plan = conversation.plan(long_message)
    assert plan.dropped_turns >= 1
    assert len(plan.token_ids) + 8 <= 512
    conversation.reply(long_message, plan=plan)
    assert conversation.messages[0]["role"] == "user"
    assert conversation.encode(conversation.messages)[:8] == conversation.encode([])[:8]  # system prompt kept
    with pytest.raises(UserError, match="context"):
        conversation.plan("word " * 600)


def test_an_interrupted_reply_is_kept(tiny_models, tokenizer):
    from d3cli.core.decode.engine import GenerationInterrupted

    loaded = LoadedModel(tiny_models["llama"], tokenizer, "llama")
    conversation = Conversation(loaded, DecodeSettings(alpha=0.8, min_layers=3, head=1, tail=1, max_new_tokens=50))
    seen = []

    def stop_after_four(event):
        seen.append(event)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(GenerationInterrupted):
        conversation.reply("Hello", on_event=stop_after_four)
    assert conversation.messages[-1] == {"role": "assistant", "content": "".join(e.text for e in seen)}
    logits, token_ids, _ = first_logits_of_next_turn(conversation, "Continue")
    assert (logits - fresh_prefill_logits(loaded.model, token_ids)).abs().max().item() < 1e-4


def test_a_reply_after_cached_turns_stops_at_the_context(tiny_models, tokenizer):
    loaded = LoadedModel(tiny_models["llama"], tokenizer, "llama")  # 512 positions
    conversation = Conversation(loaded, DecodeSettings(alpha=0.8, min_layers=3, head=1, tail=1, max_new_tokens=200))
    conversation.reply("word " * 50)
    plan = conversation.plan("word " * 50)
    assert plan.reused > 0 and plan.dropped_turns == 0
    assert len(plan.token_ids) + 200 > 512  # the room left is less than asked for
    reply = conversation.reply("word " * 50, plan=plan)
    assert reply.generated_tokens == 512 - len(plan.token_ids) or reply.finish_reason == "stop"
    assert len(plan.token_ids) + reply.generated_tokens <= 512
