"""The one user-error type and the one whole-number check: exact words, and one line with exit code 2 at the CLI."""

import io
import sys

import pytest

from d3cli.base.errors import OutputClosed, UserError, check_at_least


@pytest.mark.parametrize("value, least", [(1, 1), (7, 1), (0, 0), (-3, -5), (18, 18)])
def test_a_whole_number_at_or_above_the_bound_passes(value, least):
    assert check_at_least("--limit", value, least) is None


@pytest.mark.parametrize("value, least, message", [
    (0, 1, "--limit must be at least 1, not 0"),
    (-2, 1, "--limit must be at least 1, not -2"),
    (17, 18, "--limit must be at least 18, not 17"),
])
def test_a_number_below_the_bound_names_the_option_the_bound_and_the_value(value, least, message):
    with pytest.raises(UserError) as caught:
        check_at_least("--limit", value, least)
    assert str(caught.value) == message


@pytest.mark.parametrize("value, shown", [(True, "True"), (False, "False"), (2.0, "2.0"), ("3", "'3'"),
                                          (None, "None")])
def test_anything_but_an_int_is_not_a_whole_number(value, shown):
    """bool is an int to Python, but `true` in a config file is not a count; 2.0 and "3" are refused, not rounded."""
    with pytest.raises(UserError) as caught:
        check_at_least("batch_size", value, 0)
    assert str(caught.value) == f"batch_size must be a whole number, not {shown}"


class GoneReader(io.StringIO):
    """Standard output whose reader has gone (`d3 generate ... | head -c 20` after 20 bytes)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_output_closed_stops_quietly_and_is_no_user_error(tiny_model_dir, monkeypatch):
    """A reader that went away is not the user's mistake: no `d3: error` line, exit 141 as a shell's SIGPIPE."""
    from d3cli.cli.app import run
    from d3cli.cli.render.common import write_stdout

    assert not issubclass(OutputClosed, UserError)
    monkeypatch.setattr(sys, "stdout", GoneReader())
    with pytest.raises(OutputClosed):
        write_stdout("text")
    errors = io.StringIO()
    monkeypatch.setattr(sys, "stderr", errors)
    assert run(["generate", "--model", str(tiny_model_dir), "--no-chat", "-n", "4", "Hello"]) == 141
    assert errors.getvalue() == ""


def test_a_user_error_is_one_line_on_stderr_and_exit_2(cli):
    result = cli(["generate", "--batch-size", "0", "Hello"])
    assert result.exit_code == 2
    assert result.stderr == "d3: error: --batch-size must be at least 1, not 0\n" and result.stdout == ""
