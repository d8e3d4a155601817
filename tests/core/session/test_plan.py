"""The DecodePlan (core/session/plan.py): α and min-layers from the user where set, else the model's calibrated schedule,
else d3's default, and where each came from, from every place a user sets them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from calibration_files import FIT, identity_of, profile_for, some_bridges

from d3cli.core.calibration.model_calibration import cache_path, read_calibration, write_calibration
from d3cli.core.decode.schedule import DEFAULT_ALPHA, DEFAULT_MIN_LAYERS, DecaySchedule
from d3cli.core.session.plan import CALIBRATION, DEFAULT, OPTION, plan_of
from d3cli.core.session.settings import DecodeSettings
from d3cli.server import protocol

CHOSEN = {"alpha": 0.7, "min_layers": 3}


@pytest.fixture(scope="module")
def tiny_identity(tiny_model_dir):
    return identity_of(tiny_model_dir)


def calibration_with(tmp_path, identity, schedule):
    path = tmp_path / "c.safetensors"
    write_calibration(path, identity, profile_for(identity), some_bridges(), FIT, schedule=schedule)
    return read_calibration(path)


def test_without_a_calibration_the_default_schedule_is_used_and_said():
    plan = plan_of(DecodeSettings(head=1, tail=1), 8)
    assert plan.schedule.alpha == DEFAULT_ALPHA
    default = DecaySchedule.build(8, alpha=DEFAULT_ALPHA, min_layers=DEFAULT_MIN_LAYERS, head=1, tail=1)
    assert plan.schedule.min_layers == default.min_layers
    assert plan.sources == {"alpha": DEFAULT, "min_layers": DEFAULT} and plan.schedule_source == DEFAULT


def test_a_calibrated_schedule_is_used_where_the_user_set_nothing(tmp_path, tiny_identity):
    calibration = calibration_with(tmp_path, tiny_identity, CHOSEN)
    plan = plan_of(DecodeSettings(head=1, tail=1), 8, calibration)
    assert (plan.schedule.alpha, plan.schedule.min_layers) == (0.7, 3)
    assert plan.schedule_source == CALIBRATION


@pytest.mark.parametrize("asked, expected, sources", [
    ({"alpha": 0.9}, (0.9, 3), {"alpha": OPTION, "min_layers": CALIBRATION}),
    ({"min_layers": 5}, (0.7, 5), {"alpha": CALIBRATION, "min_layers": OPTION}),
    ({"alpha": 1.0, "min_layers": 8}, (1.0, 8), {"alpha": OPTION, "min_layers": OPTION}),
])
def test_what_the_user_sets_wins_over_the_calibration(tmp_path, tiny_identity, asked, expected, sources):
    calibration = calibration_with(tmp_path, tiny_identity, CHOSEN)
    plan = plan_of(DecodeSettings(head=1, tail=1, **asked), 8, calibration)
    assert (plan.schedule.alpha, plan.schedule.min_layers) == expected
    assert dict(plan.sources) == sources and plan.schedule_source == OPTION


def test_a_calibration_made_before_schedules_still_loads_and_the_default_is_said(tmp_path, tiny_identity):
    calibration = calibration_with(tmp_path, tiny_identity, None)
    assert calibration.schedule is None and calibration.profile is not None
    plan = plan_of(DecodeSettings(head=1, tail=1), 8, calibration)
    assert plan.schedule.alpha == DEFAULT_ALPHA and plan.schedule_source == DEFAULT
    assert plan.schedule.skip_order == "importance"  # the rest of the calibration is used as before


def test_a_bad_stored_schedule_is_one_clear_error(tmp_path, tiny_identity):
    from d3cli.base.errors import UserError

    path = tmp_path / "c.safetensors"
    write_calibration(path, tiny_identity, None, some_bridges(), FIT, schedule={"alpha": 0.9, "min_layers": 99})
    with pytest.raises(UserError, match="min_layers must be a layer count from 1 to 8"):
        read_calibration(path)


def test_a_server_request_field_wins_over_the_calibration(tmp_path, tiny_identity):
    calibration = calibration_with(tmp_path, tiny_identity, CHOSEN)
    base = DecodeSettings(head=1, tail=1)
    plain = protocol.parse_request(protocol.CHAT, {"messages": [{"role": "user", "content": "hi"}]}, base, ("m",))
    asked = protocol.parse_request(protocol.CHAT, {"messages": [{"role": "user", "content": "hi"}], "alpha": 0.9},
                                   base, ("m",))
    assert plan_of(plain.settings, 8, calibration).schedule_source == CALIBRATION
    plan = plan_of(asked.settings, 8, calibration)
    assert plan.schedule.alpha == 0.9 and plan.schedule.min_layers == 3 and plan.schedule_source == OPTION


# --- every place a user sets α, through the command line ---------------------------------------------------------


@pytest.fixture
def calibrated_tiny(tiny_model_dir, tiny_identity):
    """The tiny model with a calibration in the cache that chose α 0.7, floor 3."""
    path = cache_path(tiny_identity)
    write_calibration(path, tiny_identity, profile_for(tiny_identity), some_bridges(), FIT, schedule=CHOSEN)
    return str(tiny_model_dir)


def generated(cli, args, stdin=b""):
    json_flag = [] if "--jsonl" in args else ["--json"]
    result = cli(["generate", "-n", "6", "--head", "1", "--tail", "1", *json_flag, *args], stdin=stdin)
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_commands_use_the_calibrated_schedule_and_say_so(cli, calibrated_tiny):
    (record,) = generated(cli, ["--model", calibrated_tiny, "Hello"])
    assert (record["alpha"], record["min_layers"], record["schedule_source"]) == (0.7, 3, "calibration")


@pytest.mark.parametrize("place", ["option", "environment", "config file", "jsonl line"])
def test_alpha_set_anywhere_wins_over_the_calibration(cli, calibrated_tiny, monkeypatch, place):
    args, stdin = ["--model", calibrated_tiny], b""
    if place == "option":
        args += ["--alpha", "0.9", "Hello"]
    elif place == "environment":
        monkeypatch.setenv("D3_ALPHA", "0.9")
        args += ["Hello"]
    elif place == "config file":
        Path("d3.toml").write_text("[generate]\nalpha = 0.9\n")
        args += ["Hello"]
    else:
        args += ["--jsonl"]
        stdin = b'{"prompt": "Hello", "alpha": 0.9}\n{"prompt": "Hi"}\n'
    records = generated(cli, args, stdin)
    assert (records[0]["alpha"], records[0]["min_layers"], records[0]["schedule_source"]) == (0.9, 3, "option")
    if place == "jsonl line":  # the next line set nothing: the calibration's
        assert (records[1]["alpha"], records[1]["schedule_source"]) == (0.7, "calibration")


def test_an_uncalibrated_model_runs_full_depth_and_the_summary_says_how_to_calibrate(cli, tiny_model_dir):
    (record,) = generated(cli, ["--model", str(tiny_model_dir), "Hello"])
    assert record["schedule_source"] == "default" and set(record["layers_per_token"]) == {8}
    result = cli(["generate", "--model", str(tiny_model_dir), "-n", "6", "--stats", "Hello"])
    assert result.exit_code == 0 and "d3 calibrate chooses this model's" in " ".join(result.stderr.split())


@pytest.mark.parametrize("asked, warned", [
    ({"alpha": 0.9}, False),  # gentler than the calibration's 0.7, its floor
    ({"alpha": 0.6}, True),  # decays faster
    ({"min_layers": 2}, True),  # below its floor
    ({"alpha": 1.0}, False),  # full depth is always safe
])
def test_a_schedule_past_what_the_calibration_found_safe_is_said(tmp_path, tiny_identity, asked, warned):
    plan = plan_of(DecodeSettings(head=1, tail=1, **asked), 8, calibration_with(tmp_path, tiny_identity, CHOSEN))
    assert (plan.past_calibration is not None) == warned
    if warned:
        assert "calibration found safe (α 0.7, min-layers 3)" in plan.past_calibration


def test_any_skipping_is_said_where_the_calibration_chose_full_depth(tmp_path, tiny_identity):
    calibration = calibration_with(tmp_path, tiny_identity, {"alpha": 1.0, "min_layers": 8})
    assert "chose full depth" in plan_of(DecodeSettings(head=1, tail=1, alpha=0.97), 8, calibration).past_calibration
    assert plan_of(DecodeSettings(head=1, tail=1), 8, calibration).past_calibration is None
    assert plan_of(DecodeSettings(head=1, tail=1, alpha=0.97), 8).past_calibration is None  # no calibration
