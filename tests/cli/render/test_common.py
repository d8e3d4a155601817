"""render/common.py: plain writes and one-line errors, depth bars and blocks, and the number formats every view uses."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console

from d3cli.base.errors import OutputClosed
from d3cli.cli import render
from d3cli.cli.render.common import (
    _bar_with_marker,
    _duration,
    _fraction,
    _mean_of,
    _metric,
    _percent,
    _points,
    _ppl,
    _signed,
    _times,
)


def shown(renderable) -> str:
    console = Console(file=io.StringIO(), width=100, force_terminal=False)
    console.print(renderable)
    return console.file.getvalue()


def test_errors_warnings_and_plain_lines_go_to_stderr_one_line_each(capsys):
    render.print_error("alpha must lie in (0, 1], not 2")
    render.print_warning("interrupted")
    render.print_download("gsm8k/test.jsonl", "/data")
    render.write_stderr_line("d3: calibrate: bridges (texts): 8 to do")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["d3: error: alpha must lie in (0, 1], not 2", "d3: interrupted",
                                         "d3: downloading gsm8k/test.jsonl into /data",
                                         "d3: calibrate: bridges (texts): 8 to do"]


def test_stdout_gets_text_as_is_and_json_one_object_a_line(capsys):
    render.write_stdout("Bonjour ")
    render.write_stdout("[bold]à tous[/bold]")  # model text is never markup
    render.write_json_line({"text": "été", "layers": [8, 6]})
    out = capsys.readouterr().out
    assert out == 'Bonjour [bold]à tous[/bold]{"text": "été", "layers": [8, 6]}\n'


def test_a_closed_stdout_is_output_closed(monkeypatch):
    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    with pytest.raises(OutputClosed):
        render.write_stdout("lost")


def test_a_pinned_console_keeps_the_stderr_it_was_made_with(monkeypatch):
    before = io.StringIO()
    monkeypatch.setattr(sys, "stderr", before)
    pinned, following = render.stderr_console(pinned=True), render.stderr_console()
    after = io.StringIO()
    monkeypatch.setattr(sys, "stderr", after)
    pinned.print("progress")
    following.print("note")
    assert before.getvalue() == "progress\n" and after.getvalue() == "note\n"


@pytest.mark.parametrize("layers, block", [(8, "█"), (7, "▇"), (4, "▄"), (1, "▁"), (0, "▁"), (12, "█")])
def test_a_depth_block_is_as_tall_as_the_share_of_layers(layers, block):
    assert render.depth_block(layers, 8) == block


def test_depth_colours_run_from_green_at_full_depth_to_orange():
    assert render.depth_colour(8, 8) == "#5fd75f"
    assert render.depth_colour(4, 8) == "#ffaf2f"
    assert render.depth_colour(0, 8) == "#ff8700"
    assert render.depth_colour(3, 0) == render.depth_colour(8, 8)  # no layer count: drawn as full depth


def test_a_depth_bar_fills_its_share_and_gives_the_count():
    assert shown(render.depth_bar(6, 8)) == "█" * 22 + "░" * 8 + "   6/8 layers\n"
    assert shown(render.depth_bar(28, 30, width=10)) == "█" * 9 + "░" + "  28/30 layers\n"


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (89, "89 s"), (90, "2 min"), (5399, "90 min"),
                                           (5400, "1.5 h"), (7200, "2.0 h")])
def test_durations_switch_units_where_a_person_would(seconds, text):
    assert _duration(seconds) == text


def test_number_formats_and_their_blanks():
    assert (_points(1.25), _points(-12.5), _points(None)) == ("+1.2", "-12.5", "")
    assert (_times(1.2345), _times(None)) == ("1.23×", "")
    assert (_percent(0.1234), _percent(1), _percent(None)) == ("12.3%", "100.0%", "")
    assert (_signed(0.1), _signed(-0.256), _signed(None)) == ("+0.10", "-0.26", "–")
    assert (_fraction(0.456), _fraction(None)) == ("0.46", "–")
    assert (_metric(0.12345), _metric(0.5, "+"), _metric(12345.6)) == ("0.123", "+0.500", "1.235e+04")
    assert (_ppl(12.345), _ppl(12345.6)) == ("12.35", "1.23e+04")
    assert (_mean_of([None, 1, 2]), _mean_of([None])) == (1.5, None)


def test_a_bar_with_a_marker_where_the_marker_value_falls():
    assert _bar_with_marker(5, 8, scale=10, width=10).plain == "█████  ┃  "
    assert _bar_with_marker(20, None, scale=10, width=5).plain == "█████"  # clipped to the width
    assert _bar_with_marker(5, None, scale=0, width=4).plain == "    "  # nothing to scale by: empty
