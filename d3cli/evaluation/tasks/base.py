"""What a benchmark task is: data in, prompts out, answers extracted and scored. No torch here.

A task is data plus three small functions, as in lm-evaluation-harness: it builds each example's prompt, names its
stop strings, and extracts two answers from an output, a strict one (the stated "The answer is ..." form) and a
flexible one (the last number or option anywhere). A failed extraction is "[invalid]", never an exception.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from d3cli.base.errors import UserError
from d3cli.core.text.prompts import encode_prompt

INVALID = "[invalid]"


@dataclass(frozen=True)
class TaskOptions:
    shots: int | None = None  # None: the task's default
    chat: bool = False  # zero-shot through the model's chat template
    subtasks: tuple[str, ...] = ()  # empty: all
    limit: int | None = None  # the first N examples (per subtask)
    offset: int = 0  # skip this many examples first (per subtask)


@dataclass(frozen=True)
class Example:
    id: str  # stable across runs: "gsm8k/17", "bbh/navigate/3"
    prompt: str  # the text to continue, or the user message when `chat`
    gold: str
    chat: bool = False
    subtask: str = ""
    reference: str = ""  # a worked reference answer that continues `prompt` (profile-ppl scores it), or ""

    def prompt_ids(self, tokenizer) -> list[int]:
        """The prompt as token ids, as every command encodes it: through the chat template when the example is a
        chat one, else as raw text with the tokenizer's special tokens."""
        return encode_prompt(tokenizer, self.prompt, chat=self.chat)


@dataclass(frozen=True)
class Answer:
    strict: str
    flexible: str


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a bad line is a UserError naming the file and line."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: expected a JSON object")
        rows.append({**row, "_line": number})
    return rows


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})") from None


def take(examples: list[Example], options: TaskOptions) -> list[Example]:
    """The examples `options` asks for: `limit` of them after skipping `offset`."""
    examples = examples[options.offset:]
    return examples if options.limit is None else examples[:options.limit]
