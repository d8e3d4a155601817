"""The shell completion scripts: generated from the app, committed up to date, and working in each shell."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import REPO_ROOT

from d3cli.cli.app import app
from d3cli.cli.completions import FILE_NAMES, app_completion, script


@pytest.mark.parametrize("shell", sorted(FILE_NAMES))
def test_committed_scripts_are_up_to_date(shell):
    committed = (REPO_ROOT / "completions" / FILE_NAMES[shell]).read_text()
    assert committed == script(app, shell), (
        f"completions/{FILE_NAMES[shell]} is stale: run `d3 completions {shell} > completions/{FILE_NAMES[shell]}`"
    )


def test_the_tree_has_every_subcommand_option_and_choice():
    root = app_completion(app)
    commands = {sub.name: sub for sub in root.subcommands}
    assert {"generate", "chat", "bench", "profile-ppl", "calibrate", "serve", "config",
            "completions"} <= commands.keys()
    generate = {name: option for option in commands["generate"].options for name in option.names}
    assert generate["--device"].choices == ("auto", "cpu", "cuda", "mps")
    assert generate["--skip-order"].choices == ("auto", "middle", "late", "importance")
    assert generate["--calibration"].is_path and "--no-bridges" in generate
    assert generate["-m"].is_path and generate["--alpha"].takes_value and not generate["--compare"].takes_value
    assert "--no-chat" in generate and generate["--stop"].repeatable
    config = {sub.name: sub for sub in commands["config"].subcommands}
    assert set(config) == {"show", "path"} and "generate" in config["show"].argument_choices
    assert set(commands["completions"].argument_choices) == {"bash", "zsh", "fish"}


def bash_complete(words: list[str]) -> list[str]:
    line = " ".join(words)
    program = (f'source {REPO_ROOT / "completions" / "d3.bash"}; COMP_WORDS=({line}); '
               f'COMP_CWORD={len(words) - 1}; _d3; printf "%s\\n" "${{COMPREPLY[@]}}"')
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    return result.stdout.split()


def test_bash_completes_subcommands_options_and_choices():
    assert bash_complete(["d3", "''"]) == ["generate", "chat", "bench", "profile-ppl", "calibrate", "serve",
                                           "completions", "config"]
    assert bash_complete(["d3", "gen"]) == ["generate"]
    assert set(bash_complete(["d3", "generate", "--dev"])) == {"--device", "--device-map"}
    assert bash_complete(["d3", "chat", "--skip-order", "''"]) == ["auto", "middle", "late", "importance"]
    assert bash_complete(["d3", "generate", "--alpha", "''"]) == []
    assert bash_complete(["d3", "config", "''"]) == ["show", "path"]
    assert bash_complete(["d3", "config", "show", "g"]) == ["generate"]
    assert bash_complete(["d3", "completions", "z"]) == ["zsh"]
    assert set(bash_complete(["d3", "bench", "--ta"])) == {"--task", "--tail"}


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes_subcommands_options_and_choices(tmp_path):
    def fish_complete(line: str) -> list[str]:
        program = f"source {REPO_ROOT / 'completions' / 'd3.fish'}; complete -C '{line}'"
        result = subprocess.run(["fish", "--no-config", "-c", program], capture_output=True, text=True, check=True,
                                env={**os.environ, "HOME": str(tmp_path)})
        return [entry.split("\t")[0] for entry in result.stdout.splitlines()]

    assert {"generate", "chat", "config", "completions"} <= set(fish_complete("d3 "))
    assert set(fish_complete("d3 generate --dev")) == {"--device", "--device-map"}
    assert set(fish_complete("d3 chat --skip-order ")) == {"auto", "middle", "late", "importance"}
    assert set(fish_complete("d3 config ")) == {"show", "path"}


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completes_options_and_choices(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    functions = tmp_path / "functions"
    functions.mkdir()
    shutil.copy(REPO_ROOT / "completions" / "d3.zsh", functions / "_d3")
    child = pexpect.spawn("zsh", ["-f", "-i"], env={**os.environ, "HOME": str(tmp_path), "TERM": "dumb"},
                          encoding="utf-8", timeout=20, dimensions=(40, 200))
    child.sendline(f"fpath=({functions} $fpath); autoload -U compinit; compinit -u; PS1='READY> '")
    child.expect("READY> ")
    child.send("d3 chat --skip-order \t")
    child.expect("late")
    child.sendcontrol("c")
    child.expect("READY> ")
    child.send("d3 generate --devic\t")
    child.expect("--device")
    child.sendcontrol("c")
    child.sendline("exit")
    child.expect(pexpect.EOF)
