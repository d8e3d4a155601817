"""`--jsonl` input: each line of standard input is one prompt.

A line is plain text (the prompt), or a JSON object with a "prompt" key, an optional "id" that is echoed back, and
optional per-line options ("alpha", "max_new_tokens", "temperature", "stop", "system", ...). Blank lines are
skipped. A malformed line is an error naming its line number, or, with --skip-bad-lines, a warning.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from d3cli.base.errors import UserError
from d3cli.core.session.settings import DecodeSettings, apply_options, json_type
from d3cli.core.text.prompts import decode_utf8


@dataclass(frozen=True)
class LineRequest:
    line: int
    prompt: str
    settings: DecodeSettings
    request_id: object = None


def parse_line(text: str, line: int, base: DecodeSettings) -> LineRequest | None:
    """One input line as a request, None for a blank line; raises UserError for a malformed one."""
    stripped = text.strip()
    if not stripped:
        return None
    if not stripped.startswith("{"):
        return LineRequest(line, text.rstrip("\r\n"), base)
    try:
        fields = json.loads(stripped)
    except json.JSONDecodeError as error:
        raise UserError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    prompt = fields.pop("prompt", None)
    if not isinstance(prompt, str):
        raise UserError('a JSON line needs a "prompt" string' if prompt is None
                        else f'"prompt" must be a string, not {json_type(prompt)}')
    request_id = fields.pop("id", None)
    settings = apply_options(base, fields, extra_keys=("prompt", "id"))
    return LineRequest(line, prompt, settings, request_id)


def read_requests(
    lines: Iterable[bytes],
    base: DecodeSettings,
    prepare: Callable[[LineRequest], object],
    skip_bad_lines: bool,
    warn: Callable[[str], None],
) -> Iterator[object]:
    """Prepared prompts, one per good line, read lazily so output can start before input ends."""
    skipped = 0
    for line, raw in enumerate(lines, start=1):
        try:
            request = parse_line(decode_utf8(raw, where=f"line {line}"), line, base)
            if request is None:
                continue
            prepared = prepare(request)
        except UserError as error:
            message = str(error) if str(error).startswith(f"line {line}") else f"line {line}: {error}"
            if not skip_bad_lines:
                raise UserError(message) from None
            skipped += 1
            warn(f"skipped {message}")
            continue
        yield prepared
    if skipped:
        warn(f"{skipped} bad line{'s' if skipped != 1 else ''} skipped")
