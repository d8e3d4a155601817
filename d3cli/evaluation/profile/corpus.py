"""What profile-ppl scores: prompts with continuations, as token ids.

Three sources: a task's reference answers after its prompts (`--task`), the model's own greedy continuations of those
prompts (`--self`), or documents in a text file split into a prompt part and a continuation (`--text-file`; a
`.jsonl` file gives explicit "prompt" and "continuation" strings instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from d3cli.base.errors import UserError, check_at_least
from d3cli.core.decode.engine import decode
from d3cli.core.session.plan import plan_for
from d3cli.core.session.settings import DecodeSettings
from d3cli.core.text.prompts import decode_utf8
from d3cli.evaluation.scoring import ScoringText
from d3cli.evaluation.tasks.base import Example, read_jsonl

MIN_CONTINUATION = 2  # a continuation needs positions to profile


def fit_to_context(prompt_ids: list[int], continuation_ids: list[int], max_positions: int,
                   context: int | None) -> list[int]:
    """The continuation cut to `max_positions` tokens and to what fits in the model's context after the prompt."""
    room = max_positions if context is None else min(max_positions, context - len(prompt_ids))
    return continuation_ids[:max(room, 0)]


def reference_texts(tokenizer, examples: Sequence[Example], max_positions: int,
                    context: int | None) -> list[ScoringText]:
    """Each example's reference answer after its prompt."""
    texts = []
    for example in examples:
        if not example.reference:
            continue
        prompt_ids = example.prompt_ids(tokenizer)
        continuation = list(tokenizer(example.reference, add_special_tokens=False)["input_ids"])
        continuation = fit_to_context(prompt_ids, continuation, max_positions, context)
        if len(continuation) >= MIN_CONTINUATION:
            texts.append(ScoringText(example.id, tuple(prompt_ids), tuple(continuation)))
    return texts


def self_texts(loaded, examples: Sequence[Example], stop_strings: Sequence[str], max_positions: int,
               context: int | None, on_text=None) -> list[ScoringText]:
    """Each prompt with the model's own greedy full-depth continuation (up to `max_positions` tokens)."""
    texts = []
    for example in examples:
        prompt_ids = example.prompt_ids(loaded.tokenizer)
        room = fit_to_context(prompt_ids, list(range(max_positions)), max_positions, context)
        if len(room) >= MIN_CONTINUATION:
            settings = DecodeSettings(max_new_tokens=len(room), stop=tuple(stop_strings)).full_depth()  # greedy
            (reply,) = decode(loaded, [prompt_ids], plan_for(loaded, settings))
            if len(reply.token_ids) >= MIN_CONTINUATION:
                texts.append(ScoringText(example.id, tuple(prompt_ids), tuple(reply.token_ids)))
        if on_text is not None:
            on_text()
    return texts


def read_documents(path: Path) -> list[tuple[str, str | None]]:
    """(text, None) per blank-line-separated document of a text file, or (prompt, continuation) per JSONL line."""
    if path.suffix == ".jsonl":
        documents = []
        for row in read_jsonl(path):
            if not (isinstance(row.get("prompt"), str) and isinstance(row.get("continuation"), str)):
                raise UserError(f"{path}:{row['_line']}: needs \"prompt\" and \"continuation\" strings")
            documents.append((row["prompt"], row["continuation"]))
        return documents
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    content = decode_utf8(data, str(path))
    blocks, current = [], []
    for line in content.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return [(block, None) for block in blocks]


def file_texts(tokenizer, path: Path, prompt_tokens: int, max_positions: int, context: int | None,
               limit: int | None = None) -> list[ScoringText]:
    """Documents of a text file, each split after its first `prompt_tokens` tokens; too-short ones are skipped."""
    check_at_least("--prompt-tokens", prompt_tokens, 1)
    texts = []
    for number, (text, continuation) in enumerate(read_documents(path)):
        if continuation is None:
            ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
            prompt_ids, continuation_ids = ids[:prompt_tokens], ids[prompt_tokens:]
        else:
            prompt_ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
            continuation_ids = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        continuation_ids = fit_to_context(prompt_ids, continuation_ids, max_positions, context)
        if prompt_ids and len(continuation_ids) >= MIN_CONTINUATION:
            texts.append(ScoringText(f"{path.name}/{number}", tuple(prompt_ids), tuple(continuation_ids)))
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise UserError(f"{path} has no document longer than --prompt-tokens {prompt_tokens} plus "
                        f"{MIN_CONTINUATION} tokens (documents are separated by blank lines)")
    return texts
