"""`--jsonl` input (cli/jsonl_input.py): a line is a prompt or a JSON object with per-line options; a bad line is one
error naming its line number, or a warning with --skip-bad-lines."""

from __future__ import annotations

import dataclasses

import pytest

from d3cli.base.errors import UserError
from d3cli.cli.jsonl_input import LineRequest, parse_line, read_requests
from d3cli.core.session.settings import DecodeSettings

BASE = DecodeSettings(alpha=0.8, max_new_tokens=16)


def test_a_plain_line_is_the_prompt_as_written_under_the_base_settings():
    assert parse_line("  Tell me a story.  \r\n", 4, BASE) == LineRequest(4, "  Tell me a story.  ", BASE)
    assert parse_line("[1, 2]\n", 1, BASE).prompt == "[1, 2]"  # only an object is read as JSON


@pytest.mark.parametrize("blank", ["", "\n", "   \t\r\n"])
def test_a_blank_line_is_no_request(blank):
    assert parse_line(blank, 1, BASE) is None


def test_a_json_line_sets_its_own_options_over_the_base_and_keeps_its_id():
    text = '{"prompt": "Hi", "id": {"n": 7}, "alpha": 1, "max_new_tokens": 3, "stop": "END", "temperature": 0.5}'
    request = parse_line(text, 2, BASE)
    assert (request.line, request.prompt, request.request_id) == (2, "Hi", {"n": 7})
    assert request.settings == dataclasses.replace(BASE, alpha=1, max_new_tokens=3, stop=("END",),
                                                   sampling=dataclasses.replace(BASE.sampling, temperature=0.5))
    assert parse_line('{"prompt": "Hi"}', 1, BASE).settings == BASE


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    ('{"id": 1}', 'a JSON line needs a "prompt" string'),
    ('{"prompt": 3}', '"prompt" must be a string, not an integer'),
    ('{"prompt": "x", "alpah": 0.9}', "unknown key 'alpah' (did you mean 'alpha'?)"),
    ('{"prompt": "x", "promt": "y"}', "did you mean 'prompt'?"),
    ('{"prompt": "x", "alpha": "fast"}', "key 'alpha' must be int or float, not a string"),
    ('{"prompt": "x", "alpha": 3}', "alpha must lie in (0, 1], not 3"),
    ('{"prompt": "x", "min_layers": "lots"}', "min-layers must be a whole number of layers"),
])
def test_a_malformed_json_line_says_what_is_wrong(text, message):
    with pytest.raises(UserError) as raised:
        parse_line(text, 1, BASE)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def prompts(raw_lines, skip_bad_lines=False, prepare=None):
    warnings = []
    prepared = list(read_requests(raw_lines, BASE, prepare or (lambda request: (request.line, request.prompt)),
                                  skip_bad_lines, warnings.append))
    return prepared, warnings


def test_requests_carry_their_line_numbers_past_blank_lines():
    prepared, warnings = prompts([b"first\n", b"\n", b'{"prompt": "third"}\n', b"fourth"])
    assert prepared == [(1, "first"), (3, "third"), (4, "fourth")] and warnings == []


@pytest.mark.parametrize("bad, message", [
    (b"{oops\n", "line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    (b"caf\xe9\n", "line 2 is not valid UTF-8 (byte 3): d3 reads UTF-8 text"),
])
def test_a_bad_line_stops_the_input_with_one_error_naming_it(bad, message):
    with pytest.raises(UserError) as raised:
        prompts([b"good\n", bad, b"never read\n"])
    assert str(raised.value) == message


def test_skip_bad_lines_warns_for_each_and_counts_them():
    prepared, warnings = prompts([b"good\n", b"{oops\n", b'{"prompt": 1}\n', b"\xff\n", b"last\n"],
                                 skip_bad_lines=True)
    assert prepared == [(1, "good"), (5, "last")]
    assert warnings == [
        "skipped line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        'skipped line 3: "prompt" must be a string, not an integer',
        "skipped line 4 is not valid UTF-8 (byte 0): d3 reads UTF-8 text",
        "3 bad lines skipped",
    ]
    assert prompts([b"{oops\n", b"fine\n"], skip_bad_lines=True)[1][-1] == "1 bad line skipped"


def test_a_line_its_preparation_refuses_is_named_too():
    def prepare(request):
        if "long" in request.prompt:
            raise UserError("the prompt is longer than the model's context of 512 tokens")
        return request.prompt

    with pytest.raises(UserError, match=r"^line 2: the prompt is longer than the model's context of 512 tokens$"):
        prompts([b"short\n", b"too long\n"], prepare=prepare)
    assert prompts([b"short\n", b"too long\n"], skip_bad_lines=True, prepare=prepare)[0] == ["short"]


def test_lines_are_read_only_as_requests_are_taken():
    read = []

    def lines():
        for number in range(1, 4):
            read.append(number)
            yield f"prompt {number}\n".encode()

    requests = read_requests(lines(), BASE, lambda request: request.prompt, False, lambda message: None)
    assert next(requests) == "prompt 1" and read == [1]  # output can start before the input ends
    assert list(requests) == ["prompt 2", "prompt 3"] and read == [1, 2, 3]
