"""The prompts d3 ships: the answer checks of the replies' prompts, the calibration corpus's chat and raw prompts
interleaved with the held-out ones apart, and each encoded as its kind says."""

from d3cli.core.text.prompts import encode_prompt
from d3cli.evaluation.builtin_prompts import (
    SCHEDULE_PROMPTS,
    ReplyPrompt,
    builtin_prompts,
    builtin_reply_prompts,
    encode_builtin,
    encoded,
    held_out_prompts,
)


def test_answer_checks():
    number = ReplyPrompt("n", "chat", "?", number="391")
    assert number.check("17 × 23 = 391.") and number.check("It is 391") and not number.check("It is 3910")
    assert ReplyPrompt("n", "chat", "?", number="1500").check("about 1,500 people")
    words = ReplyPrompt("w", "chat", "?", words=("Tokyo",))
    assert words.check("The capital is tokyo.") and not words.check("Kyoto")
    assert ReplyPrompt("x", "chat", "?").check("anything") is None


def test_builtin_prompts_have_unique_ids_and_valid_checks():
    prompts = builtin_reply_prompts()
    assert len(prompts) >= 12 and len({prompt.id for prompt in prompts}) == len(prompts)
    assert all(prompt.kind in ("chat", "raw") and prompt.text for prompt in prompts)
    assert any(prompt.number for prompt in prompts) and any(prompt.words for prompt in prompts)


def test_the_corpus_interleaves_chat_and_raw_and_never_holds_the_held_out_prompts():
    corpus = builtin_prompts()
    assert {kind for kind, _ in corpus[:4]} == {"chat", "raw"}  # any first few mix both kinds
    held_out = held_out_prompts()
    assert len(held_out) == SCHEDULE_PROMPTS and all(prompt.id.startswith("held-out/") for prompt in held_out)
    assert not {prompt.text for prompt in held_out} & {text for _, text in corpus}
    assert builtin_prompts(3) == corpus[:3]


def test_a_chat_prompt_goes_through_the_template_and_a_raw_one_does_not(tokenizer):
    assert encode_builtin(tokenizer, "chat", "Hi") == encode_prompt(tokenizer, "Hi", chat=True)
    assert encode_builtin(tokenizer, "raw", "Hi") == list(tokenizer("Hi", add_special_tokens=True)["input_ids"])
    assert encoded(tokenizer, ReplyPrompt("x", "raw", "Hi")) == encode_builtin(tokenizer, "raw", "Hi")
