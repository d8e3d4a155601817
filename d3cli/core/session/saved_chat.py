"""The file `/save` writes and `/load` reads in `d3 chat`: the conversation, its system message and settings.

    {"format": "d3-chat", "version": 1, "model": ..., "system": ..., "settings": {...}, "messages": [...]}

The settings are kept as the options a JSONL line takes (`settings_as_options`), so a saved chat reads back through
the same checks as any other options. No torch here.
"""

from __future__ import annotations

import json
from pathlib import Path

from d3cli.base.errors import UserError
from d3cli.base.files import write_atomically
from d3cli.core.session.settings import DecodeSettings, apply_options, json_type, settings_as_options

SAVE_FORMAT = "d3-chat"


def write_saved_chat(path: Path, model: str, system: str | None, settings: DecodeSettings,
                     messages: list[dict[str, str]]) -> None:
    document = {
        "format": SAVE_FORMAT,
        "version": 1,
        "model": model,
        "system": system,
        "settings": settings_as_options(settings),
        "messages": messages,
    }
    write_atomically(path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def read_saved_chat(path: Path, base: DecodeSettings):
    """(system, settings, messages, model) from a /save file; a UserError names what is wrong with it."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not a saved chat: {error}") from None
    if not isinstance(document, dict) or document.get("format") != SAVE_FORMAT:
        raise UserError(f"{path} is not a chat saved by d3 (no \"format\": \"{SAVE_FORMAT}\")")
    messages = document.get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(message, dict) and message.get("role") in ("user", "assistant")
        and isinstance(message.get("content"), str) for message in messages
    ):
        raise UserError(f"{path}: \"messages\" must be a list of {{\"role\": \"user\"|\"assistant\", "
                        f"\"content\": text}}")
    system = document.get("system")
    if system is not None and not isinstance(system, str):
        raise UserError(f"{path}: \"system\" must be text or null, not {json_type(system)}")
    options = document.get("settings", {})
    if not isinstance(options, dict):
        raise UserError(f"{path}: \"settings\" must be an object")
    try:
        settings = apply_options(base, options)
    except UserError as error:
        raise UserError(f"{path}: settings: {error}") from None
    return system, settings, messages, document.get("model")
