"""`d3 calibrate` (evaluation/calibrate/run.py): the model's replies, its layer profile and bridges, written where every
command finds them; resumed after an interruption (the command's bad options: tests/cli/commands/test_calibrate.py)."""

from __future__ import annotations

import json
import os
import re

import pytest
from calibration_files import identity_of

from d3cli.core.calibration.model_calibration import cache_path, read_calibration


@pytest.fixture
def tiny_identity(tiny_model_dir):
    return identity_of(tiny_model_dir)


def test_calibrate_writes_to_the_cache_and_every_command_finds_it(cli, tiny_model_dir, tiny_identity):
    result = cli(["calibrate", "--model", str(tiny_model_dir), "--prompts", "4", "--reply-tokens", "24",
                  "--profile-texts", "2", "--head", "1", "--tail", "1", "--schedule-prompts", "2",
                  "--schedule-tokens", "12", "--time-limit", "2h", "--json"])
    assert result.exit_code == 0, result.stderr
    made = json.loads(result.stdout)
    assert made["calibration"] == str(cache_path(tiny_identity)) and made["tokens"] > 40
    assert made["time_limit_s"] == 7200 and made["time_limit_cost"] is None  # it fits: nothing cut
    # in a pipe: the estimate first, then a line as each stage starts and ends
    lines = result.stderr.strip().splitlines()
    assert re.match(r"d3: calibrating .*: about \d+ s here \(replies \d+ s, layer profile \d+ s, bridges \d+ s, "
                    r"schedule, at most \d+ s\)", lines[0]), lines
    for label in ("replies (tokens)", "layer profile (texts)", "bridges (texts)", "schedule (replies)"):
        assert any(re.match(rf"d3: calibrate: {re.escape(label)}: \d+ to do, about \d+ s$", line) for line in lines)
        assert any(re.match(rf"d3: calibrate: {re.escape(label)}: done in \d+ s$", line) for line in lines)
    assert len(made["bridged_runs"]) == 6 and sorted(made["drop_order"]) == [1, 2, 3, 4, 5, 6]
    record = json.loads(cli(["generate", "--model", str(tiny_model_dir), "-n", "10", "--alpha", "0.6",
                             "--min-layers", "2", "--head", "1", "--tail", "1", "--json", "Hello"]).stdout)
    assert record["calibration"] == made["calibration"] and record["skip_order"] == "importance"
    assert record["bridged_runs"] and record["unbridged_runs"] == []
    calibration = read_calibration(made["calibration"])
    assert calibration.fit["tokens"] == made["tokens"] and calibration.profile.num_layers == 8
    os.unlink(made["calibration"])  # the next tests see an uncalibrated tiny model again


def test_calibrate_chooses_a_schedule_and_schedule_only_chooses_again(cli, tiny_model_dir, tiny_identity, tmp_path):
    made = json.loads(cli(["calibrate", "--model", str(tiny_model_dir), "--prompts", "4", "--reply-tokens", "24",
                           "--profile-texts", "2", "--head", "1", "--tail", "1", "--schedule-prompts", "2",
                           "--schedule-tokens", "12", "--json"]).stdout)
    schedule = made["schedule"]
    assert schedule["budget"] == {"nll": 0.1, "repetition": 0.05} and schedule["prompts"] == 2
    assert schedule["candidates"] and schedule["step_costs"]["t_layer_ms"] > 0
    stored = read_calibration(made["calibration"]).schedule
    assert (stored["alpha"], stored["min_layers"]) == (schedule["alpha"], schedule["min_layers"])

    # a budget nothing can miss: the fastest candidate tried is chosen, written where -o says; order and bridges kept
    again = tmp_path / "again.safetensors"
    result = cli(["calibrate", "--model", str(tiny_model_dir), "--schedule-only", "--budget", "1000",
                  "--head", "1", "--tail", "1", "--schedule-prompts", "2", "--schedule-tokens", "12",
                  "-o", str(again), "--json"])
    assert result.exit_code == 0, result.stderr
    rechosen = json.loads(result.stdout)["schedule"]
    assert rechosen["budget"]["nll"] == 1000 and rechosen["alpha"] < 1
    fastest = max(candidate["predicted_speedup"] for candidate in rechosen["candidates"])
    assert rechosen["predicted_speedup"] == fastest
    before, after = read_calibration(made["calibration"]), read_calibration(again)
    assert after.profile == before.profile and sorted(after.bridges) == sorted(before.bridges)
    record = json.loads(cli(["generate", "--model", str(tiny_model_dir), "--calibration", str(again), "-n", "6",
                             "--head", "1", "--tail", "1", "--json", "Hello"]).stdout)
    assert (record["alpha"], record["min_layers"]) == (rechosen["alpha"], rechosen["min_layers"])
    assert record["schedule_source"] == "calibration"
    os.unlink(made["calibration"])


def test_an_interrupted_calibration_goes_on_where_its_replies_stopped(tiny_model_dir, monkeypatch, tmp_path):
    from d3cli.core.decode import engine
    from d3cli.core.model.loader import load, model_identity
    from d3cli.evaluation.calibrate import run as calibration
    from d3cli.evaluation.calibrate import stages
    from d3cli.evaluation.calibrate.checkpoint import CalibrationCheckpoint
    from d3cli.evaluation.calibrate.options import CalibrationOptions

    loaded = load(str(tiny_model_dir))
    options = CalibrationOptions(prompts=4, reply_tokens=24, batch_size=2, profile_texts=2, head=1,
                                 tail=1, schedule_prompts=2, schedule_tokens=12)
    corpus_batches = []
    real_decode = engine.decode

    def counting(loaded, prompts, plan, **kwargs):
        if plan.max_new_tokens == options.reply_tokens:  # the corpus stage's replies
            corpus_batches.append(len(prompts))
        return real_decode(loaded, prompts, plan, **kwargs)

    def interrupt_in_the_second_batch(stage, amount):
        if stage == "corpus" and len(corpus_batches) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(stages, "decode", counting)  # the corpus stage's replies
    output = tmp_path / "made.safetensors"
    with pytest.raises(KeyboardInterrupt):
        calibration.calibrate(loaded, options, output, interrupt_in_the_second_batch)
    checkpoint = CalibrationCheckpoint(model_identity(loaded), options)
    assert list(checkpoint.batches) == [0] and not output.exists()
    corpus_batches.clear()
    result = calibration.calibrate(loaded, options, output, lambda stage, amount: None)
    assert corpus_batches == [2]  # only the batch that was interrupted is decoded again
    assert result.texts >= 3 and output.is_file() and not checkpoint.path.exists()


@pytest.mark.parametrize("interrupted, kept", [("bridges", "measure_layer_profile"), ("schedule", "fit_bridges")])
def test_an_interruption_keeps_every_finished_stage(tiny_model_dir, monkeypatch, tmp_path, interrupted, kept):
    """Interrupted in the bridges stage, the layer profile is kept; in the schedule stage, the bridges too: the next
    run does neither again, and its calibration holds what was kept."""
    from d3cli.core.model.loader import load, model_identity
    from d3cli.evaluation.calibrate import run as calibration
    from d3cli.evaluation.calibrate.checkpoint import CalibrationCheckpoint
    from d3cli.evaluation.calibrate.options import CalibrationOptions

    loaded = load(str(tiny_model_dir))
    options = CalibrationOptions(prompts=4, reply_tokens=24, batch_size=2, profile_texts=2, head=1,
                                 tail=1, schedule_prompts=2, schedule_tokens=12)
    calls, real = [], getattr(calibration, kept)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    def interrupt(stage, amount):
        if stage == interrupted:
            raise KeyboardInterrupt

    monkeypatch.setattr(calibration, kept, counting)
    output = tmp_path / "made.safetensors"
    with pytest.raises(KeyboardInterrupt):
        calibration.calibrate(loaded, options, output, interrupt)
    checkpoint = CalibrationCheckpoint(model_identity(loaded), options)
    profile = checkpoint.profile(2)
    assert calls == [1] and profile is not None and not output.exists()
    result = calibration.calibrate(loaded, options, output, lambda stage, amount: None)
    assert calls == [1]  # not done again
    made = read_calibration(str(output))
    assert made.profile.as_dict()["layers"] == profile.as_dict()["layers"]
    assert set(made.bridges) == {tuple(run) for run in result.runs} and made.fit["tokens"] == result.tokens > 0
    assert not list(checkpoint.path.parent.glob(f"{checkpoint.path.stem}*"))  # removed once written
