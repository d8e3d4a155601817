"""The prompts d3 ships, in one place: the calibration's corpus and held-out prompts (calibration-prompts.json) and
the everyday prompts of `bench --task replies` (reply-prompts.json), and how each is encoded.

    ReplyPrompt              a prompt, its kind (chat or raw) and what a good reply must contain
    builtin_reply_prompts    bench --task replies' prompts
    builtin_prompts          the calibration corpus's prompts (chat and raw interleaved), held-out ones excluded
    held_out_prompts         the last prompts, which no bridge was fitted on: the schedule stage's
    encode_builtin/encoded   a chat prompt through the chat template where there is one, a raw one as plain text
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from d3cli.base.paths import BUNDLED
from d3cli.core.text.prompts import encode_prompt

CALIBRATION_PROMPTS_FILE = BUNDLED / "calibration-prompts.json"
REPLY_PROMPTS_FILE = BUNDLED / "reply-prompts.json"
SCHEDULE_PROMPTS = 12  # held-out prompts the candidate schedules answer


@dataclass(frozen=True)
class ReplyPrompt:
    """A prompt, how it is encoded (`chat`: through the chat template; `raw`: as plain text), and optionally what a
    good reply must contain: a number (`number`) or one of some words (`words`)."""

    id: str
    kind: str
    text: str
    number: str | None = None
    words: tuple[str, ...] = ()

    def check(self, reply_text: str) -> bool | None:
        """Whether `reply_text` has the answer; None when this prompt has no check."""
        if self.number is not None:
            numbers = [part.replace(",", "") for part in re.findall(r"-?\d[\d,]*(?:\.\d+)?", reply_text)]
            return any(number.rstrip("0").rstrip(".") == self.number.rstrip("0").rstrip(".") if "." in number
                       else number == self.number for number in numbers)
        if self.words:
            lowered = reply_text.lower()
            return any(re.search(rf"\b{re.escape(word.lower())}\b", lowered) for word in self.words)
        return None


def builtin_reply_prompts() -> list[ReplyPrompt]:
    """The everyday prompts of `bench --task replies`."""
    data = json.loads(REPLY_PROMPTS_FILE.read_text(encoding="utf-8"))
    return [ReplyPrompt(entry["id"], entry.get("kind", "chat"), entry["text"], entry.get("number"),
                        tuple(entry.get("words", ()))) for entry in data["prompts"]]


def builtin_prompts(limit: int | None = None, held_out: int = SCHEDULE_PROMPTS) -> list[tuple[str, str]]:
    """(kind, text) of the built-in prompts the corpus is made of, chat and raw interleaved so that any first N mix
    both kinds; the last `held_out` of them are never among them (the schedule stage's, `held_out_prompts`)."""
    mixed = _all_builtin()[:-held_out] if held_out else _all_builtin()
    return mixed[:limit] if limit is not None else mixed


def held_out_prompts(count: int = SCHEDULE_PROMPTS):
    """The last `count` built-in prompts, which no bridge was fitted on: the schedule stage's (fidelity.ReplyPrompt)."""
    return [ReplyPrompt(f"held-out/{index}", kind, text) for index, (kind, text) in enumerate(_all_builtin()[-count:])]


def _all_builtin() -> list[tuple[str, str]]:
    data = json.loads(CALIBRATION_PROMPTS_FILE.read_text(encoding="utf-8"))
    chat, raw = [("chat", text) for text in data["chat"]], [("raw", text) for text in data["raw"]]
    mixed, every = [], max(1, round(len(chat) / max(len(raw), 1)))
    while chat or raw:
        mixed += chat[:every] + raw[:1]
        chat, raw = chat[every:], raw[1:]
    return mixed


def encode_builtin(tokenizer, kind: str, text: str) -> list[int]:
    """A chat prompt through the chat template (when the tokenizer has one), a raw one as plain text."""
    return encode_prompt(tokenizer, text, chat=None if kind == "chat" else False)


def encoded(tokenizer, prompt: ReplyPrompt) -> list[int]:
    return encode_builtin(tokenizer, prompt.kind, prompt.text)
