"""render/live.py: the reply as it streams, the loading bar (on a terminal only, never in a script's stderr), the
calibration's estimate and stage lines, bench progress."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from d3cli.cli import render


def test_no_bar_where_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert render.LoadingBar("m").progress is None


def test_on_a_terminal_the_bar_counts_the_layers_and_goes_away(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    with render.LoadingBar("m") as bar:
        assert bar.progress is not None
        for done in range(1, 5):
            bar.progress(done, 4)
        assert bar.bar.tasks[0].completed == 4 and bar.bar.tasks[0].total == 4
    assert not bar.bar.live.is_started


def test_the_loader_reports_each_built_layer(tiny_model_dir):
    from d3cli.core.model.loader import load

    calls = []
    load(str(tiny_model_dir), progress=lambda built, total: calls.append((built, total)))
    assert calls == [(index, 8) for index in range(1, 9)]


def console() -> Console:
    return Console(file=io.StringIO(), width=100, force_terminal=False)


def token(text: str, layers: int, elapsed_s: float) -> SimpleNamespace:
    """What ReplyView reads of an engine TokenEvent."""
    return SimpleNamespace(text=text, layers=layers, elapsed_s=elapsed_s)


def test_a_reply_view_ends_with_the_text_and_a_block_per_token():
    out = console()
    with render.ReplyView(out, num_layers=8) as view:
        for index, (text, layers) in enumerate([("Hello", 8), (" [b]world[/b]", 6), ("!", 2)], start=1):
            view.add(token(text, layers, elapsed_s=0.5 * index))
    assert out.file.getvalue() == "Hello [b]world[/b]!\n\nlayers per token (█ = all 8, ▁ = few):\n█▆▂\n"
    assert view.tokens_per_s == 2.0  # 3 tokens in 1.5 s


def test_while_it_streams_the_status_line_shows_the_count_depth_and_rate():
    view = render.ReplyView(console(), num_layers=8)
    view.add(token("a", 8, elapsed_s=0.0))  # no time yet: no rate
    assert view.tokens_per_s == 0.0
    view.add(token("b", 2, elapsed_s=0.25))
    out = console()
    out.print(view._live_renderable())
    assert out.file.getvalue().splitlines() == ["ab", "", "█▂", "token    2  " + "█" * 8 + "░" * 22 + "   2/8 layers"
                                                + "     8.0 tok/s"]


def test_the_calibration_estimate_names_each_stage_and_the_total():
    estimate = {"corpus": 30, "profile": 100, "bridges": 4000, "schedule": 7200}
    assert render.calibration_estimate_text("SmolLM2", estimate) == (
        "calibrating SmolLM2: about 3.1 h here (replies 30 s, layer profile 2 min, bridges 67 min, schedule, at most "
        "2.0 h)")


def test_stage_lines_say_when_each_stage_starts_and_how_long_it_took(capsys, monkeypatch):
    clock = iter([100.0, 112.4, 112.4, 312.4])
    monkeypatch.setattr("d3cli.cli.render.live.time", SimpleNamespace(perf_counter=lambda: next(clock)))
    lines = render.StageLines({"corpus": "replies (tokens)", "bridges": "bridges (texts)"})
    lines.start("corpus", 1024, estimate=15.0)
    lines.start("bridges", 8, estimate=None)  # the next stage ends the one before
    lines.finish()
    lines.finish()  # nothing running: nothing said
    assert capsys.readouterr().err.splitlines() == [
        "d3: calibrate: replies (tokens): 1024 to do, about 15 s",
        "d3: calibrate: replies (tokens): done in 12 s",
        "d3: calibrate: bridges (texts): 8 to do",
        "d3: calibrate: bridges (texts): done in 3 min",
    ]


def test_bench_progress_counts_each_method_from_where_it_resumed():
    out = console()
    with render.BenchProgress(out) as progress:
        progress.add("full", "full depth", total=4, completed=1)
        progress.add("d3", "d3 α=0.9", total=4, completed=0)
        progress.start("full")
        progress.advance("full", 2)
        progress.advance("d3")
    lines = out.file.getvalue().splitlines()
    assert lines[0].startswith("full depth ") and "3/4" in lines[0]
    assert lines[1].startswith("d3 α=0.9 ") and "1/4" in lines[1]
