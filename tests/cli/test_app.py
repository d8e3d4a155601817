"""The `d3` app itself: version, help, and what importing it costs."""

from __future__ import annotations

import subprocess
import sys


def test_version_and_help(cli):
    from d3cli import __version__

    assert cli(["--version"]).stdout.strip() == f"d3 {__version__}"
    help_text = cli(["generate", "--help"])
    assert help_text.exit_code == 0
    for option in ("--alpha", "--min-layers", "--warmup", "--head", "--tail", "--skip-order", "--compare",
                   "--jsonl", "--batch-size", "--stop", "--chat", "--system", "--seed", "--top-p"):
        assert option in help_text.stdout


def test_the_cli_imports_no_torch_until_a_command_needs_it():
    """`d3 --help`, completions and option errors stay fast: the app and every command module import without torch,
    transformers, the engine, lm-eval or the web server's packages (they are imported inside the commands)."""
    heavy = ("torch", "transformers", "d3cli.core.decode.engine", "safetensors", "starlette", "uvicorn", "d3cli.server.app",
             "lm_eval")
    program = ("import sys, d3cli.cli.app, typer.main; typer.main.get_command(d3cli.cli.app.app); "
               f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"
