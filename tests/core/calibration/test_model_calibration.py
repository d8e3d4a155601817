"""Calibration files: written whole or not at all, read back exactly, found for the right model only, and every
damaged or foreign file one clear line."""

from __future__ import annotations

import json
import os

import pytest
import torch
from calibration_files import FIT, calibration_file, identity_of, profile_for, some_bridges

from d3cli.base.errors import UserError
from d3cli.core.calibration.model_calibration import (
    cache_path,
    find_calibration,
    read_calibration,
    read_header,
    write_calibration,
)
from d3cli.core.decode.bridges import Bridge


@pytest.fixture
def tiny_identity(tiny_model_dir):
    return identity_of(tiny_model_dir)


def test_a_calibration_reads_back_exactly(tmp_path, tiny_identity):
    path = tmp_path / "c.safetensors"
    bridges = some_bridges()
    write_calibration(path, tiny_identity, profile_for(tiny_identity), bridges, FIT)
    calibration = read_calibration(path)
    assert calibration.model == tiny_identity and calibration.fit == FIT
    assert calibration.profile.importance_ranking()[:3] == [3, 2, 4]
    assert sorted(calibration.bridges) == [(2, 4), (3, 3)]
    assert torch.equal(calibration.bridges[(3, 3)].weight, bridges[0].weight.half().float())  # stored as float16
    assert calibration.bridges[(3, 3)].weight.dtype == torch.float32
    assert calibration.bridges[(2, 4)].rank == 4
    assert torch.equal(calibration.bridges[(2, 4)].up, bridges[1].up.half().float())
    assert read_header(path)["fit"] == FIT
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"], "no temporary file is left behind"


def test_a_crash_while_writing_leaves_nothing_behind(tmp_path, tiny_identity, monkeypatch):
    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(UserError, match="No space left"):
        write_calibration(tmp_path / "c.safetensors", tiny_identity, None, some_bridges(), FIT)
    assert list(tmp_path.iterdir()) == []


def test_the_cache_is_searched_for_this_model_only(tmp_path, tiny_identity):
    assert find_calibration(tiny_identity) is None
    mine = cache_path(tiny_identity)
    other = dict(tiny_identity, fingerprint=tiny_identity["fingerprint"] * 2, name="other")
    write_calibration(cache_path(other), other, None, some_bridges(), FIT)
    assert find_calibration(tiny_identity) is None, "another model's calibration is passed over"
    (mine.parent / "junk.safetensors").write_bytes(b"not a safetensors file")
    write_calibration(mine, tiny_identity, None, some_bridges(), FIT)
    assert find_calibration(tiny_identity) == mine
    assert "8L-64d" in mine.name


def test_a_calibration_serves_every_weight_kind_and_the_cache_prefers_the_models_own(tmp_path, tiny_identity):
    assert tiny_identity["weights"] == "float32"
    as_int4 = dict(tiny_identity, weights="int4")
    made_on_float = cache_path(tiny_identity)
    write_calibration(made_on_float, tiny_identity, None, some_bridges(), FIT)
    assert find_calibration(as_int4) == made_on_float, "made on float32 weights, it serves int4 ones"
    made_on_int4 = cache_path(as_int4)
    assert made_on_int4 != made_on_float and made_on_int4.name.endswith("-int4.safetensors")
    write_calibration(made_on_int4, as_int4, None, some_bridges(), FIT)
    os.utime(made_on_float)  # the float32 one is now the newest: each kind still finds its own
    assert find_calibration(as_int4) == made_on_int4
    assert find_calibration(tiny_identity) == made_on_float
    assert read_calibration(made_on_int4).weights == "int4"
    before = {key: value for key, value in tiny_identity.items() if key != "weights"}
    assert read_calibration(made_on_float).weights == "float32" and cache_path(before) != made_on_float


def damaged(path, how: str):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(64))
    elif how == "no metadata":
        from safetensors.torch import save_file

        save_file({"bridge.3.3.weight": torch.zeros(64, 64)}, str(path))


@pytest.mark.parametrize("how, message", [
    ("truncated", "cut short"),
    ("empty", "0 bytes long"),
    ("garbage", "not a"),
    ("no metadata", "no d3 metadata"),
])
def test_a_damaged_file_is_one_clear_error(tmp_path, tiny_identity, how, message):
    path = tmp_path / "c.safetensors"
    write_calibration(path, tiny_identity, None, some_bridges(), FIT)
    damaged(path, how)
    with pytest.raises(UserError, match=message):
        read_calibration(path)


@pytest.mark.parametrize("bridge, message", [
    (Bridge(3, 3, weight=torch.full((64, 64), float("nan"))), "NaN or infinite"),
    (Bridge(3, 3, weight=torch.zeros(32, 32)), r"expected \(64, 64\)"),
    (Bridge(2, 9, weight=torch.zeros(64, 64)), "the model has 8"),
    (Bridge(2, 4, down=torch.zeros(64, 4), up=torch.zeros(3, 64)), "expected"),
])
def test_matrices_that_do_not_fit_are_refused(tmp_path, tiny_identity, bridge, message):
    path = tmp_path / "c.safetensors"
    write_calibration(path, tiny_identity, None, [bridge], FIT)
    with pytest.raises(UserError, match=message):
        read_calibration(path)


def test_generate_uses_a_calibration_and_says_so(cli, tiny_model_dir, tmp_path, tiny_identity):
    path = calibration_file(tmp_path, tiny_identity)
    args = ["generate", "--model", str(tiny_model_dir), "--calibration", path, "-n", "12", "--alpha", "0.9",
            "--min-layers", "4", "--head", "1", "--tail", "1", "--json", "Hello"]
    record = json.loads(cli(args).stdout)
    assert record["calibration"] == path and record["skip_order"] == "importance" and record["bridges"] is True
    # depths 8, 7, 6, 5, 5, 4...; the profile drops 3, 2, 4, 1: runs 3, 2-3, 2-4, 1-4, of which 3 and 2-4 are bridged
    assert record["layers_per_token"][:6] == [8, 7, 6, 5, 5, 4]
    assert record["bridged_runs"] == [[3, 3], [2, 4]]
    assert record["unbridged_runs"] == [[2, 3], [1, 4]]
    plain = json.loads(cli([*args, "--no-bridges"]).stdout)
    assert plain["bridges"] is False and plain["bridged_runs"] == [] and plain["skip_order"] == "importance"
    assert plain["layers_per_token"] == record["layers_per_token"]
    assert record["calibration_weights"] == "float32" == record["weights"]
    stats = cli([*args[:-2], "--stats", "Hello"])
    assert f"calibration {path}, bridges over layers" in stats.stderr
    on_int8 = json.loads(cli([*args[:-2], "--weights", "int8", "--json", "Hello"]).stdout)
    assert on_int8["weights"] == "int8" and on_int8["calibration"] == path and on_int8["bridged_runs"]
    stats = cli([*args[:-2], "--weights", "int8", "--stats", "Hello"])
    assert f"calibration {path} (made on float32 weights), bridges over layers" in " ".join(stats.stderr.split())


def test_a_model_without_calibration_says_how_to_make_one(cli, tiny_model_dir):
    result = cli(["generate", "--model", str(tiny_model_dir), "-n", "8", "--alpha", "0.7", "--min-layers", "4",
                  "--head", "1", "--tail", "1", "--stats", "Hello"])
    assert result.exit_code == 0, result.stderr
    assert "skip order middle" in result.stderr and "d3 calibrate" in result.stderr
    record = json.loads(cli(["generate", "--model", str(tiny_model_dir), "-n", "4", "--json", "--head", "1",
                             "--tail", "1", "--min-layers", "4", "Hello"]).stdout)
    assert record["calibration"] is None and record["bridges"] is False


@pytest.mark.parametrize("problem, message", [
    ({"fingerprint": 9.0}, "does not fit this model: it was made for"),
    ({"num_layers": 12}, "does not fit this model: it is for a model with 12 layers"),
    ("truncated", "cut short"),
    ("missing", "cannot read the calibration file"),
])
def test_a_bad_calibration_option_is_one_line_and_exit_2(cli, tiny_model_dir, tmp_path, tiny_identity, problem,
                                                          message):
    if problem == "missing":
        path = str(tmp_path / "missing.safetensors")
    elif problem == "truncated":
        path = calibration_file(tmp_path, tiny_identity)
        damaged(tmp_path / "c.safetensors", "truncated")
    else:
        path = calibration_file(tmp_path, tiny_identity, **problem)
    for command in (["generate", "Hello"], ["chat"]):
        result = cli([*command, "--model", str(tiny_model_dir), "--calibration", path, "-n", "4"], stdin=b"Hi\n")
        result.assert_user_error(message)
