"""Prompts: reading them from the shell, turning them into token ids, checking them against the model's context."""

from __future__ import annotations

import sys
from typing import BinaryIO

from d3cli.base.errors import UserError


def decode_utf8(data: bytes, where: str = "standard input") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{where} is not valid UTF-8 (byte {error.start}): d3 reads UTF-8 text") from None


def read_stdin_prompt(stream: BinaryIO | None = None) -> str:
    """The whole of standard input as one prompt; a trailing newline is not part of it."""
    stream = stream if stream is not None else sys.stdin.buffer
    return decode_utf8(stream.read()).rstrip("\r\n")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt: str, chat: bool | None = None, system: str | None = None) -> list[int]:
    """Token ids of `prompt`: through the chat template (when asked, or by default when there is one) or as raw text."""
    if not prompt.strip():
        raise UserError("the prompt is empty")
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    if use_chat and not has_chat_template(tokenizer):
        raise UserError("--chat was asked for but this model's tokenizer has no chat template (use --no-chat)")
    if not use_chat:
        if system is not None:
            raise UserError("--system needs a chat template, and this model's tokenizer has none")
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return encode_chat(tokenizer, messages)


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation through the chat template, ending where the assistant's reply begins."""
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as error:  # jinja2 raises TemplateError (e.g. a template that rejects a system message)
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"the model's chat template rejected the conversation: {message}") from None
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return list(encoded)


def check_fits_context(prompt_tokens: int, context: int | None) -> None:
    """A prompt must leave room for at least one generated token."""
    if context is not None and prompt_tokens >= context:
        raise UserError(
            f"the prompt is {prompt_tokens} tokens, longer than the model's context of {context} tokens"
            if prompt_tokens > context
            else f"the prompt fills the model's whole context of {context} tokens, leaving no room for a reply"
        )
