"""render/replies.py: a reply's summary (panel and --stats line), the chat's banner, turn lines, session totals and
`d3 config show`'s table, from the records the commands print with --json."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from d3cli.cli import render

RECORD = {
    "model": "tiny", "weights": "float32", "weights_detail": "float32", "alpha": 0.9, "min_layers": 4, "warmup": 0,
    "head": 1, "tail": 1, "skip_order": "middle", "schedule_source": "option", "schedule_warning": None,
    "calibration": None, "calibration_weights": None, "bridges": False, "bridged_runs": [], "num_layers": 8,
    "prompt_tokens": 31, "generated_tokens": 4, "layers_per_token": [8, 7, 6, 5], "mean_layers": 6.5,
    "layer_ratio": 0.8125, "estimated_speedup": 1.2308, "time_s": 1.3265, "tokens_per_s": 3.016,
    "prefill_tokens_per_s": 62.676, "decode_tokens_per_s": 3.606, "finish_reason": "length", "load_s": 5.26,
    "peak_memory_bytes": 461348864,
}
TOTALS = {"turns": 2, "generated_tokens": 8, "mean_layers": 5.75, "num_layers": 8, "layer_ratio": 0.71875,
          "tokens_per_s": 3.14, "estimated_speedup": 1.3913}


def shown(draw, *args) -> str:
    console = Console(file=io.StringIO(), width=100, force_terminal=False)
    draw(console, *args)
    return console.file.getvalue()


def test_the_summary_rows_of_a_reply():
    assert render.summary_rows(RECORD) == [
        ("schedule", "α=0.9, min-layers 4, head 1, tail 1, warmup 0, skip order middle (as set)"),
        ("calibration", "none for this model (d3 calibrate fits its layer order and bridges)"),
        ("weights", "float32"),
        ("tokens", "4 (length)"),
        ("mean layers", "6.5 of 8"),
        ("layer compute", "81.2% of full depth"),
        ("tokens/s", "3.6 decoding, 62.7 prefill (31 prompt tokens), 3.0 over the whole reply"),
        ("load", "5.3 s, peak memory 0.43 GiB"),
        ("speedup (estimated)", "1.23× from layer counts; an upper bound"),
    ]


def test_a_compared_calibrated_reply_adds_its_warning_bridges_and_baseline():
    record = {**RECORD, "schedule_source": "calibration", "schedule_warning": "α below the calibrated range",
              "calibration": "/cache/tiny.safetensors", "calibration_weights": "int8", "bridges": True,
              "bridged_runs": [[2, 3], [5, 5]], "unbridged_runs": [[6, 6]], "load_s": None,
              "baseline": {"generated_tokens": 4, "tokens_per_s": 2.5}, "measured_speedup": 1.2064, "identical": False}
    rows = dict(render.summary_rows(record))
    assert list(rows) == ["schedule", "warning", "calibration", "weights", "tokens", "mean layers", "layer compute",
                          "tokens/s", "speedup (estimated)", "full depth", "speedup (measured)",
                          "identical to full depth"]  # no load row without a load time
    assert rows["schedule"].endswith("skip order middle (chosen by the model's calibration)")
    assert rows["warning"] == "α below the calibrated range"
    assert rows["calibration"] == ("/cache/tiny.safetensors (made on int8 weights), bridges over layers 2–3, 5 "
                                   "(no bridge for 1 run(s): skipped plainly)")
    assert rows["full depth"] == "4 tokens, 2.5 tokens/s"
    assert rows["speedup (measured)"] == "1.21× wall clock, tokens/s over full depth"
    assert rows["identical to full depth"] == "no"


@pytest.mark.parametrize("changes, text", [
    ({"schedule_source": "option"}, " (as set)"),
    ({"schedule_source": "calibration"}, " (chosen by the model's calibration)"),
    ({"schedule_source": "calibration", "alpha": 1.0},
     " (full depth: the model's calibration found no schedule whose replies stay within its budget)"),
    ({"schedule_source": "default"},
     " (d3's conservative default for a model it has not calibrated: d3 calibrate chooses this model's)"),
    ({"schedule_source": "default", "calibration": "c.safetensors"},
     " (d3's conservative default: this calibration chose none; d3 calibrate --schedule-only chooses one)"),
    ({"schedule_source": None}, ""),
])
def test_the_schedule_row_says_where_alpha_and_the_floor_came_from(changes, text):
    assert render.schedule_source_text({**RECORD, **changes}) == text


@pytest.mark.parametrize("changes, text", [
    ({"calibration": "c", "bridges": False}, "c, bridges off"),
    ({"calibration": "c", "bridges": True, "bridged_runs": []}, "c, bridges on"),
    ({"calibration": "c", "bridges": True, "bridged_runs": [[3, 3]], "calibration_weights": "float32"},
     "c, bridges over layers 3"),  # made on the weights in use: not said
])
def test_the_calibration_row(changes, text):
    assert render.calibration_text({**RECORD, **changes}) == text


def test_rates_and_load_leave_out_what_was_not_measured():
    assert render.tokens_per_s_text({**RECORD, "decode_tokens_per_s": None, "prefill_tokens_per_s": None}) == \
        "3.0 over the whole reply"
    assert render.load_text({**RECORD, "peak_memory_bytes": None}) == "5.3 s"


def test_the_panel_and_the_stats_line_hold_the_same_rows(capsys):
    panel = shown(render.print_summary, RECORD)
    assert "D3 summary" in panel.splitlines()[0]
    for label, value in render.summary_rows(RECORD):
        assert any(label in line and value in line for line in panel.splitlines()), (label, value)
    render.print_stats(RECORD)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == render.stats_line(RECORD) + "\n"
    assert captured.err.startswith("d3: schedule α=0.9, min-layers 4,") and captured.err.count("\n") == 1
    assert "; mean layers 6.5 of 8; layer compute 81.2% of full depth; " in captured.err


def test_chat_lines_turn_summary_banner_and_notes():
    assert render.turn_summary(RECORD) == "4 tokens (length) · 6.5/8 layers · 3.0 tok/s · estimated speedup 1.23×"
    assert shown(render.print_turn_summary, RECORD) == render.turn_summary(RECORD) + "\n"
    assert shown(render.print_chat_banner, "tiny", "α=0.9, min-layers 4 of 8") == (
        "d3 chat · tiny\nα=0.9, min-layers 4 of 8 · /help for commands · Ctrl-D to leave\n")
    assert shown(render.print_info, "saved to [bold]chat.json[/bold]") == "saved to [bold]chat.json[/bold]\n"


def test_session_totals_as_a_line_and_as_a_panel():
    assert render.stats_text(TOTALS) == ("2 replies, 8 tokens, mean layers 5.8 of 8 (71.9% of full depth), 3.1 "
                                         "tokens/s, estimated speedup 1.39×")
    panel = shown(render.print_session_stats, TOTALS).splitlines()
    assert "session" in panel[0]
    assert [re.split(r"\s{2,}", line.strip("│ ")) for line in panel[1:-1]] == [
        ["replies", "2"], ["tokens", "8"], ["mean layers", "5.8 of 8"], ["layer compute", "71.9% of full depth"],
        ["tokens/s", "3.1"], ["speedup (estimated)", "1.39× from layer counts; an upper bound"]]


def test_config_show_prints_each_value_as_json_with_its_source():
    table = shown(render.print_settings, {
        "generate": {"alpha": {"value": 0.9, "source": "environment D3_ALPHA"},
                     "stop": {"value": ["END"], "source": "default"},
                     "system": {"value": None, "source": "default"}},
        "chat": {"seed": {"value": 7, "source": "user file /home/u/.config/d3/config.toml"}},
    })
    lines = [line.split() for line in table.splitlines()]
    assert lines[0] == ["d3", "generate"]
    assert ["alpha", "│", "0.9", "│", "environment", "D3_ALPHA"] in lines
    assert ["stop", "│", '["END"]', "│", "default"] in lines and ["system", "│", "null", "│", "default"] in lines
    assert ["d3", "chat"] in lines
    assert ["seed", "│", "7", "│", "user", "file", "/home/u/.config/d3/config.toml"] in lines


def test_a_served_reply_says_where_it_was_made_instead_of_a_load():
    rows = dict(render.summary_rows({**RECORD, "load_s": None, "server": "http://127.0.0.1:8000"}))
    assert rows["served by"] == "http://127.0.0.1:8000" and "load" not in rows
