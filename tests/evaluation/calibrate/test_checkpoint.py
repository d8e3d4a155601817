"""An unfinished calibration's work (evaluation/calibrate/checkpoint.py): batches of replies, the layer profile and
the bridges read back as they were saved, each keyed by what it depends on, and all removed together. (An interrupted
calibration going on from them: test_run.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from calibration_files import profile_for, some_bridges

from d3cli.evaluation.calibrate import checkpoint as checkpoint_module
from d3cli.evaluation.calibrate.checkpoint import CalibrationCheckpoint
from d3cli.evaluation.calibrate.options import CalibrationOptions
from d3cli.evaluation.scoring import ScoringText

IDENTITY = {"name": "tiny", "model_type": "llama", "num_layers": 8, "hidden_size": 64, "vocab_size": 49152,
            "fingerprint": 0.25}
OPTIONS = CalibrationOptions(prompts=4, reply_tokens=24, batch_size=2)
TEXTS = [ScoringText("builtin/0", (1, 2, 3), (4, 5)), ScoringText("builtin/1", (6,), (7, 8, 9))]
FIT = {"ridge": 0.1, "rank": None, "head": 1, "tail": 1, "fewest_layers": None, "profile_texts": 2,
       "drop_order": [3, 4, 2, 5, 1, 6], "runs": [[2, 4], [3, 3]], "tokens": 123}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "cache_home", lambda: tmp_path / "cache")


def test_saved_batches_are_read_back_by_the_next_run_with_the_same_options(tmp_path):
    first = CalibrationCheckpoint(IDENTITY, OPTIONS)
    assert first.path.parent == tmp_path / "cache" / "calibrations" / "partial" and not first.path.exists()
    assert first.batches == {} and first.texts(0) is None
    first.save(0, TEXTS)
    first.save(2, TEXTS[1:])
    again = CalibrationCheckpoint(IDENTITY, OPTIONS)
    assert sorted(again.batches) == [0, 2]
    assert again.texts(0) == TEXTS and again.texts(2) == TEXTS[1:] and again.texts(4) is None
    # the replies do not depend on the later stages' options: the same checkpoint
    later = dataclasses.replace(OPTIONS, ridge=1.0, rank=4, profile_texts=1, budget=0.5, schedule_prompts=2)
    assert CalibrationCheckpoint(IDENTITY, later).texts(0) == TEXTS
    for other in (dataclasses.replace(OPTIONS, prompts=8), dataclasses.replace(OPTIONS, reply_tokens=32),
                  dataclasses.replace(OPTIONS, batch_size=4)):
        assert CalibrationCheckpoint(IDENTITY, other).texts(0) is None  # other replies: begun afresh
    assert CalibrationCheckpoint({**IDENTITY, "fingerprint": 0.5}, OPTIONS).texts(0) is None  # other weights


@pytest.mark.parametrize("content", ["not json", "[1, 2]"])
def test_a_damaged_checkpoint_is_begun_afresh(content):
    CalibrationCheckpoint(IDENTITY, OPTIONS).save(0, TEXTS)
    CalibrationCheckpoint(IDENTITY, OPTIONS).path.write_text(content)
    assert CalibrationCheckpoint(IDENTITY, OPTIONS).batches == {}


def test_the_profile_and_the_bridges_are_kept_by_what_they_depend_on():
    checkpoint = CalibrationCheckpoint(IDENTITY, OPTIONS)
    profile = profile_for(IDENTITY)
    assert checkpoint.profile(2) is None and checkpoint.bridges(FIT) is None
    checkpoint.save_profile(profile, 2)
    assert checkpoint.profile(2) == profile and checkpoint.profile(3) is None  # measured on another sample
    checkpoint.profile_path(3).write_text("{broken")
    assert checkpoint.profile(3) is None  # a damaged one is measured again
    bridges = some_bridges()
    checkpoint.save_bridges(IDENTITY, profile, bridges, FIT)
    kept, tokens = checkpoint.bridges({**FIT, "tokens": 999})  # the path is keyed by the fit's options, not its size
    assert tokens == 123
    assert {(bridge.first, bridge.last) for bridge in kept} == {(bridge.first, bridge.last) for bridge in bridges}
    by_run = {(bridge.first, bridge.last): bridge for bridge in kept}
    assert torch.allclose(by_run[3, 3].weight.float(), bridges[0].weight, atol=1e-3)
    for name, value in (("ridge", 1.0), ("rank", 4), ("head", 2), ("tail", 2), ("fewest_layers", 3),
                        ("profile_texts", 3), ("drop_order", [4, 3, 2, 5, 1, 6]), ("runs", [[3, 3]])):
        assert checkpoint.bridges_path({**FIT, name: value}) != checkpoint.bridges_path(FIT), name
        assert checkpoint.bridges({**FIT, name: value}) is None
    checkpoint.bridges_path({**FIT, "ridge": 2.0}).write_bytes(b"not safetensors")
    assert checkpoint.bridges({**FIT, "ridge": 2.0}) is None


def test_remove_deletes_the_batches_the_profiles_and_the_bridges_but_no_other_runs(tmp_path):
    checkpoint = CalibrationCheckpoint(IDENTITY, OPTIONS)
    other = CalibrationCheckpoint(IDENTITY, dataclasses.replace(OPTIONS, prompts=8))
    checkpoint.save(0, TEXTS)
    other.save(0, TEXTS)
    checkpoint.save_profile(profile_for(IDENTITY), 2)
    checkpoint.save_profile(profile_for(IDENTITY), 3)
    checkpoint.save_bridges(IDENTITY, profile_for(IDENTITY), some_bridges(), FIT)
    assert len(list(checkpoint.path.parent.iterdir())) == 5
    checkpoint.remove()
    assert list(checkpoint.path.parent.iterdir()) == [other.path]
    checkpoint.remove()  # nothing left: no error


def test_a_checkpoint_of_other_built_in_prompts_is_not_taken_up(monkeypatch):
    options = CalibrationOptions(prompts=4)
    before = CalibrationCheckpoint({"model": "m"}, options).path
    monkeypatch.setattr(checkpoint_module, "builtin_prompts", lambda count: [("chat", "another question")] * 4)
    assert CalibrationCheckpoint({"model": "m"}, options).path != before
