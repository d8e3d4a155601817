"""Prompts: standard input read as UTF-8 (one line and exit 2 when it is not), token ids through the chat template or
as raw text, and the check against the model's context."""

from __future__ import annotations

import copy
import io

import pytest

from d3cli.base.errors import UserError
from d3cli.core.text.prompts import (
    check_fits_context,
    decode_utf8,
    encode_chat,
    encode_prompt,
    has_chat_template,
    read_stdin_prompt,
)


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The embedded tokenizer without its chat template."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def test_standard_input_is_one_prompt_without_its_trailing_newlines():
    assert read_stdin_prompt(io.BytesIO(b"  Line one\nline two\r\n\n")) == "  Line one\nline two"
    assert read_stdin_prompt(io.BytesIO("Grüße 🙂\n".encode())) == "Grüße 🙂"
    assert read_stdin_prompt(io.BytesIO(b"")) == ""


def test_bytes_that_are_not_utf8_say_where_and_at_which_byte():
    with pytest.raises(UserError) as caught:
        read_stdin_prompt(io.BytesIO(b"abc\xffdef"))
    assert str(caught.value) == "standard input is not valid UTF-8 (byte 3): d3 reads UTF-8 text"
    with pytest.raises(UserError, match=r"^prompts\.txt is not valid UTF-8 \(byte 0\)"):
        decode_utf8("é".encode("latin-1"), "prompts.txt")
    assert decode_utf8("é".encode()) == "é"


def test_bad_standard_input_is_one_line_and_exit_2(cli, tiny_model_dir):
    result = cli(["generate", "--model", str(tiny_model_dir)], stdin=b"Hello \xc3(")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == "d3: error: standard input is not valid UTF-8 (byte 6): d3 reads UTF-8 text\n"


def test_the_chat_template_is_used_by_default_when_the_tokenizer_has_one(tokenizer, plain_tokenizer):
    assert has_chat_template(tokenizer) and not has_chat_template(plain_tokenizer)
    templated = encode_prompt(tokenizer, "Name a colour.")
    assert templated == encode_prompt(tokenizer, "Name a colour.", chat=True)
    assert templated == encode_chat(tokenizer, [{"role": "user", "content": "Name a colour."}])
    assert tokenizer.decode(templated).endswith("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    raw = tokenizer("Name a colour.", add_special_tokens=True)["input_ids"]
    assert encode_prompt(tokenizer, "Name a colour.", chat=False) == raw
    assert encode_prompt(plain_tokenizer, "Name a colour.") == raw  # no template: raw text


def test_a_system_message_comes_first(tokenizer):
    decoded = tokenizer.decode(encode_prompt(tokenizer, "Hi", system="Answer in French."))
    assert decoded.startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")
    assert "SmolLM" not in decoded  # the template's own system message is replaced, not kept


@pytest.mark.parametrize("prompt, chat, system, message", [
    ("", None, None, "the prompt is empty"),
    (" \n\t", False, None, "the prompt is empty"),
    ("Hi", True, None, "--chat was asked for but this model's tokenizer has no chat template (use --no-chat)"),
    ("Hi", None, "Be brief.", "--system needs a chat template, and this model's tokenizer has none"),
])
def test_prompts_that_cannot_be_encoded_are_user_errors(plain_tokenizer, prompt, chat, system, message):
    with pytest.raises(UserError) as caught:
        encode_prompt(plain_tokenizer, prompt, chat=chat, system=system)
    assert str(caught.value) == message


def test_a_template_that_rejects_the_conversation_is_one_line(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported"
                            "\\nsee the docs') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert encode_chat(strict, [{"role": "user", "content": "Hi"}]) == tokenizer.encode("Hi")
    with pytest.raises(UserError) as caught:
        encode_prompt(strict, "Hi", system="Be brief.")
    assert str(caught.value) == "the model's chat template rejected the conversation: System role not supported"


@pytest.mark.parametrize("tokens, context, message", [
    (1, None, None),
    (100_000, None, None),
    (9, 10, None),
    (10, 10, "the prompt fills the model's whole context of 10 tokens, leaving no room for a reply"),
    (11, 10, "the prompt is 11 tokens, longer than the model's context of 10 tokens"),
])
def test_a_prompt_must_leave_room_for_one_token(tokens, context, message):
    if message is None:
        assert check_fits_context(tokens, context) is None
    else:
        with pytest.raises(UserError) as caught:
            check_fits_context(tokens, context)
        assert str(caught.value) == message
