"""The `d3` app itself (cli/app.py): version, help, what importing it costs, and the edge where errors become exits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_version_and_help(cli):
    from d3cli import __version__

    assert cli(["--version"]).stdout.strip() == f"d3 {__version__}"
    help_text = cli(["generate", "--help"])
    assert help_text.exit_code == 0
    for option in ("--alpha", "--min-layers", "--warmup", "--head", "--tail", "--skip-order", "--compare",
                   "--jsonl", "--batch-size", "--stop", "--chat", "--system", "--seed", "--top-p"):
        assert option in help_text.stdout


def test_the_cli_imports_no_torch_until_a_command_needs_it():
    """`d3 --help`, completions, option errors and `--server` calls stay fast: the app and every command module import
    without torch, transformers, the engine, lm-eval or the web server's packages (they are imported inside the
    commands), without Rich (a piped run writes plain text; the views import it when they draw) and without pydantic
    (typer 0.29 and later build a pydantic validator per option at each start: pyproject.toml keeps typer below)."""
    heavy = ("torch", "transformers", "d3cli.core.decode.engine", "safetensors", "starlette", "uvicorn",
             "d3cli.server.app", "lm_eval", "rich", "pydantic")
    program = ("import sys, d3cli.cli.app, typer.main; typer.main.get_command(d3cli.cli.app.app); "
               f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"


def failing_with(error: BaseException):
    def fail():
        raise error

    return fail


def test_a_bug_is_one_line_and_exit_1_with_the_traceback_on_request(cli, monkeypatch):
    monkeypatch.setattr("d3cli.cli.app.configuration_state", failing_with(RuntimeError("boom")))
    result = cli(["generate", "Hello"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == "d3: error: internal error: RuntimeError: boom (run with D3_DEBUG=1 for the traceback)\n"
    monkeypatch.setenv("D3_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        cli(["generate", "Hello"])


def test_ctrl_c_is_exit_130_and_one_line(cli, monkeypatch):
    monkeypatch.setattr("d3cli.cli.app.configuration_state", failing_with(KeyboardInterrupt()))
    result = cli(["generate", "Hello"])
    assert (result.exit_code, result.stdout, result.stderr) == (130, "", "\nd3: interrupted\n")


def test_a_usage_error_names_the_help_of_its_command(cli):
    result = cli(["generate", "--max-new-tokens", "many", "Hello"])
    result.assert_user_error()
    assert result.stderr.startswith("d3: error: Invalid value for '--max-new-tokens'")
    assert result.stderr.endswith(" (see `d3 generate --help`)\n")


def test_only_the_first_process_of_a_launch_prints_a_user_error(cli, monkeypatch):
    monkeypatch.setattr("d3cli.cli.app.secondary_process", lambda: True)
    for args in (["generate", "--alpha", "2", "Hello"], ["generate", "--frobnicate"]):
        result = cli(args)
        assert (result.exit_code, result.stderr) == (2, "")


def test_a_broken_config_file_stops_a_command_before_it_starts(cli):
    """(`d3 config path` still lists the files: commands/test_config.py.)"""
    Path("d3.toml").write_text("alpah = 0.9\n")
    for args in (["completions", "bash"], ["generate", "Hello"]):
        refused = cli(args)
        assert refused.exit_code == 2 and refused.stdout == ""
        assert refused.stderr == f"d3: error: {Path.cwd() / 'd3.toml'}: unknown key 'alpah' (did you mean 'alpha'?)\n"


def test_help_and_version_work_with_a_broken_config_file(cli):
    """They run nothing, and the help is how a user finds what to fix."""
    Path("d3.toml").write_text("alpah = 0.9\n")
    for args in (["--help"], ["generate", "--help"], ["--version"]):
        shown = cli(args)
        assert shown.exit_code == 0 and shown.stderr == "", args
        assert ("Usage: d3" in shown.stdout) if "--help" in args else shown.stdout.startswith("d3 "), args


def test_a_bare_d3_shows_the_help_without_an_empty_error_line(cli):
    shown = cli([])
    assert "Usage: d3" in shown.stdout + shown.stderr and "d3: error" not in shown.stderr


def test_generate_leaves_without_the_interpreters_teardown_and_with_everything_written(tiny_model_dir):
    """`main` ends a generate that imported torch with os._exit once stdout and stderr are flushed (the teardown of
    torch's modules is 0.17-0.25 s of each call); a command that loads nothing exits as usual."""
    import json

    program = ("import atexit, sys; atexit.register(lambda: sys.stderr.write('torn down')); "
               "import d3cli.cli.app as app; sys.argv = ['d3', *sys.argv[1:]]; app.main()")
    done = subprocess.run([sys.executable, "-c", program, "generate", "--model", str(tiny_model_dir), "-n", "3",
                           "--jsonl"], input='{"prompt": "Hi"}\n{"prompt": "Bye"}\n', capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["generated_tokens"] for line in done.stdout.splitlines()] == [3, 3]
    assert "torn down" not in done.stderr
    mistake = subprocess.run([sys.executable, "-c", program, "generate", "--model", str(tiny_model_dir), "-n", "0",
                              "Hi"], capture_output=True, text=True, timeout=300)
    assert mistake.returncode == 2 and "torn down" in mistake.stderr  # nothing loaded: the usual exit
    version = subprocess.run([sys.executable, "-c", program, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("d3 ") and "torn down" in version.stderr
