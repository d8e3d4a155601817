"""The loading bar: drawn on a terminal while the decoder layers are built, never in a script's stderr."""

from __future__ import annotations

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
