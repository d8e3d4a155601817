"""The saved layer profile and the `importance` skip order built from it."""

from __future__ import annotations

import json

import pytest

from d3cli.base.errors import UserError
from d3cli.core.calibration.layer_profile import (
    BUNDLED_PROFILE,
    LayerProfile,
    LayerScore,
    check_profile_matches,
    importance_order,
    load_profile,
)
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.core.session.plan import plan_of
from d3cli.core.session.settings import DecodeSettings

IDENTITY = {"name": "tiny", "model_type": "llama", "num_layers": 6, "hidden_size": 64, "vocab_size": 100,
            "fingerprint": 0.25}
INCREASES = [5.0, 0.3, 0.01, 0.2, 0.05, 2.0]
INFLUENCES = [0.9, 0.2, 0.1, 0.15, 0.1, 0.5]


def make_profile(increases=INCREASES, identity=IDENTITY) -> LayerProfile:
    return LayerProfile(model=identity, corpus="test", texts=3, late_from=4,
                        layers=tuple(LayerScore(i, INFLUENCES[i], value) for i, value in enumerate(increases)))


def test_the_importance_order_is_a_permutation_that_follows_the_scores():
    profile = make_profile()
    assert profile.importance_ranking() == [2, 4, 3, 1, 5, 0]
    order = importance_order(profile)([1, 2, 3, 4])
    assert sorted(order) == [1, 2, 3, 4]
    assert order == [2, 4, 3, 1]
    assert [INCREASES[layer] for layer in order] == sorted(INCREASES[layer] for layer in order)


def test_ties_in_nll_fall_back_to_block_influence():
    profile = make_profile(increases=[1.0, 0.1, 0.1, 0.1, 0.1, 1.0])
    assert profile.importance_ranking()[:4] == [2, 4, 3, 1]


def test_a_schedule_with_the_importance_order_drops_the_cheapest_layers_first(tmp_path):
    path = tmp_path / "profile.json"
    make_profile().save(path)
    saved = json.loads(path.read_text())
    assert saved["importance_ranking"] == [2, 4, 3, 1, 5, 0] and saved["model"] == IDENTITY
    settings = DecodeSettings(alpha=0.5, min_layers=2, head=1, tail=1, skip_order="importance", profile=str(path))
    schedule = plan_of(settings, 6).schedule
    assert schedule.skip_order == "importance"
    assert schedule.drop_order == (2, 4, 3, 1)
    assert schedule.kept_layers(1) == (0, 1, 5)  # k_1 = 3: layers 2, 4, 3 dropped
    assert set(schedule.kept_layers(2)) <= set(schedule.kept_layers(1))
    with pytest.raises(UserError, match="6 layers"):
        plan_of(settings, 8).schedule


def test_importance_comes_from_a_profile_or_the_calibration(tmp_path):
    from d3cli.core.calibration.model_calibration import BUNDLED_CALIBRATION, read_calibration

    with pytest.raises(UserError, match="importance only"):
        DecodeSettings(skip_order="middle", profile="p.json")
    with pytest.raises(UserError, match="needs the model's layer profile"):
        DecaySchedule.build(6, skip_order="importance")
    with pytest.raises(UserError, match="needs a layer profile of this model: make its calibration with d3 calibrate"):
        plan_of(DecodeSettings(skip_order="importance"), 30).schedule
    assert plan_of(DecodeSettings(), 30).schedule.skip_order == "middle", "auto without a calibration is middle"
    calibration = read_calibration(BUNDLED_CALIBRATION)
    for order in ("importance", "auto"):
        schedule = plan_of(DecodeSettings(skip_order=order), 30, calibration).schedule
        assert schedule.skip_order == "importance"
        assert schedule.drop_order == tuple(calibration.fit["drop_order"])
    with pytest.raises(UserError, match="30 layers, this one has 8"):
        plan_of(DecodeSettings(skip_order="importance", profile=str(BUNDLED_PROFILE)), 8).schedule
    with pytest.raises(UserError, match="make one with d3 profile-ppl --save-profile"):
        check_profile_matches(load_profile(BUNDLED_PROFILE), IDENTITY, BUNDLED_PROFILE)


def test_a_profile_of_another_model_is_refused(tmp_path):
    profile = make_profile()
    check_profile_matches(profile, dict(IDENTITY, name="same weights elsewhere", fingerprint=0.2501), "p.json")
    with pytest.raises(UserError, match="6 layers, tiny has 8"):
        check_profile_matches(profile, dict(IDENTITY, num_layers=8), "p.json")
    with pytest.raises(UserError, match="hidden_size"):
        check_profile_matches(profile, dict(IDENTITY, hidden_size=128), "p.json")
    with pytest.raises(UserError, match="weights differ"):
        check_profile_matches(profile, dict(IDENTITY, fingerprint=0.3), "p.json")


@pytest.mark.parametrize("content, message", [
    ("{not json", "p.json:1:2"),
    ('{"format": "other"}', "not a d3 layer profile"),
    ('{"format": "d3-layer-profile/1", "model": {}, "layers": [{"layer": 1, "block_influence": 0, '
     '"nll_increase": 0}]}', "every layer once"),
])
def test_a_malformed_profile_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_profile(path)
    with pytest.raises(UserError, match="cannot read"):
        load_profile(tmp_path / "missing.json")
