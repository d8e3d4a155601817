"""`d3 calibrate` (evaluation/calibrate.py): the model's replies, its layer profile and bridges, written where every
command finds them; bad options one line."""

from __future__ import annotations

import json
import os

import pytest
from calibration_files import identity_of

from d3cli.core.model_calibration import cache_path, read_calibration


@pytest.fixture
def tiny_identity(tiny_model_dir):
    return identity_of(tiny_model_dir)


def test_calibrate_writes_to_the_cache_and_every_command_finds_it(cli, tiny_model_dir, tiny_identity):
    result = cli(["calibrate", "--model", str(tiny_model_dir), "--prompts", "4", "--reply-tokens", "24",
                  "--profile-texts", "2", "--head", "1", "--tail", "1", "--json"])
    assert result.exit_code == 0, result.stderr
    made = json.loads(result.stdout)
    assert made["calibration"] == str(cache_path(tiny_identity)) and made["tokens"] > 40
    assert len(made["bridged_runs"]) == 6 and sorted(made["drop_order"]) == [1, 2, 3, 4, 5, 6]
    record = json.loads(cli(["generate", "--model", str(tiny_model_dir), "-n", "10", "--alpha", "0.6",
                             "--min-layers", "2", "--head", "1", "--tail", "1", "--json", "Hello"]).stdout)
    assert record["calibration"] == made["calibration"] and record["skip_order"] == "importance"
    assert record["bridged_runs"] and record["unbridged_runs"] == []
    calibration = read_calibration(made["calibration"])
    assert calibration.fit["tokens"] == made["tokens"] and calibration.profile.num_layers == 8
    os.unlink(made["calibration"])  # the next tests see an uncalibrated tiny model again


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "--rank must be at least 1"),
    (["--reply-tokens", "4"], "--reply-tokens must be at least 18"),
    (["--ridge", "0"], "--ridge must be above 0"),
    (["--head", "4", "--tail", "4"], "leave no layer"),
])
def test_bad_calibrate_options_are_one_line(cli, tiny_model_dir, args, message):
    result = cli(["calibrate", "--model", str(tiny_model_dir), *args])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
