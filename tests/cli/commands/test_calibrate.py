"""`d3 calibrate` at the command line: its options, and the mistakes refused before the model loads. The
mistakes that need the model are here too; calibrating is tests/evaluation/calibrate/test_run.py's."""

from __future__ import annotations

import pytest


def test_help_lists_the_calibration_options(cli):
    result = cli(["calibrate", "--help"])
    assert result.exit_code == 0 and result.stderr == ""
    for option in ("--model", "--prompts", "--reply-tokens", "--batch-size", "--profile-texts", "--rank", "--ridge",
                   "--head", "--tail", "--budget", "--schedule-prompts", "--schedule-tokens", "--time-limit",
                   "--schedule-only", "--calibration", "--output", "--json"):
        assert option in result.stdout, option


@pytest.mark.parametrize("args, message", [
    (["--prompts", "0"], "--prompts must be at least 1, not 0"),
    (["--prompts", "many"], "Invalid value for '--prompts'"),
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--profile-texts", "0"], "--profile-texts must be at least 1, not 0"),
    (["--schedule-prompts", "0"], "--schedule-prompts must be at least 1, not 0"),
    (["--schedule-tokens", "4"], "--schedule-tokens must be at least 8, not 4"),
    (["--budget", "0"], "--budget must be above 0 nats per token, not 0.0"),
    (["--budget", "-0.1"], "--budget must be above 0 nats per token, not -0.1"),
    (["--calibration", "mine.safetensors"], "--calibration names the calibration --schedule-only chooses for; a new "
                                            "calibration goes to --output"),
])
def test_a_mistake_is_one_line_and_exit_2_before_the_model_loads(cli, nothing_loads, args, message):
    result = cli(["calibrate", *args])
    result.assert_user_error(message, nothing_printed=True)


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "--rank must be at least 1"),
    (["--reply-tokens", "4"], "--reply-tokens must be at least 18"),
    (["--ridge", "0"], "--ridge must be above 0"),
    (["--head", "4", "--tail", "4"], "leave no layer"),
    (["--time-limit", "soon"], "--time-limit takes a duration such as 90s, 30m, 2h or 1h30m, not 'soon'"),
    (["--time-limit", "0m"], "--time-limit must be above zero"),
    (["--time-limit", "0.001s", "--reply-tokens", "24"], "even the smallest calibration"),
])
def test_bad_calibrate_options_are_one_line(cli, tiny_model_dir, args, message):
    result = cli(["calibrate", "--model", str(tiny_model_dir), *args])
    result.assert_user_error(message)


def test_schedule_only_needs_a_calibration(cli, tiny_model_dir):
    result = cli(["calibrate", "--model", str(tiny_model_dir), "--schedule-only"])
    assert result.exit_code == 2 and "--schedule-only needs the model's calibration" in result.stderr
