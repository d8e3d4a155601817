"""The front door: `open_model` loads, attaches the calibration and plans; a Session's encode, stream and decode are
the prompt functions' and the engine's, and another model's calibration or profile is refused with one line."""

import dataclasses

import pytest

from d3cli.base.errors import UserError
from d3cli.core.decode import engine
from d3cli.core.model.loader import ModelOptions, load
from d3cli.core.session.front_door import Session, attach_calibration, open_model, session_of
from d3cli.core.session.plan import plan_for
from d3cli.core.session.settings import DecodeSettings
from d3cli.core.text.prompts import encode_prompt


@pytest.fixture(scope="module")
def session():
    return open_model(ModelOptions(device="cpu"), DecodeSettings(max_new_tokens=6))


@pytest.mark.embedded
def test_open_model_attaches_the_bundled_calibration_and_plans_the_settings(session):
    assert isinstance(session, Session) and session.name == "SmolLM2-135M-Instruct (embedded)"
    assert session.loaded.calibration is not None and session.loaded.calibration.label == "bundled"
    assert session.plan == plan_for(session.loaded, session.settings)
    assert session.plan.schedule_source == "calibration"
    assert session.model is session.loaded.model and session.tokenizer is session.loaded.tokenizer


@pytest.mark.embedded
def test_encode_stream_and_decode_are_the_prompts_and_the_engines(session):
    ids = session.encode("Name a colour.")
    assert ids == encode_prompt(session.tokenizer, "Name a colour.")
    assert session.encode("Name a colour.", chat=False) == encode_prompt(session.tokenizer, "Name a colour.", False)
    assert session.encode_chat([{"role": "user", "content": "Name a colour."}]) == ids
    (reply,) = session.decode([ids])
    (expected,) = engine.decode(session.loaded, [ids], session.plan)
    assert reply.token_ids == expected.token_ids and len(reply.token_ids) == 6
    events = list(session.stream([ids]))
    assert [event.token_id for event in events] == reply.token_ids


@pytest.mark.embedded
def test_other_settings_get_their_own_plan_on_the_same_model(session):
    deeper = dataclasses.replace(session.settings, alpha=0.9, min_layers=20)
    other = session.with_settings(deeper)
    assert other.loaded is session.loaded and other.plan.schedule.alpha == 0.9
    assert other.plan.schedule_source == "option" and session.plan_for() is session.plan
    (reply,) = session.decode([session.encode("Hi")], plan=other.plan)
    assert reply.layers_per_token[0] == 30 and min(reply.layers_per_token) < 30  # D3 from the first decode step


@pytest.mark.embedded
def test_a_profile_of_another_model_is_refused(tmp_path, tiny_model_dir):
    from d3cli.core.calibration.layer_profile import LayerProfile, LayerScore

    tiny = load(str(tiny_model_dir), device="cpu")
    profile = tmp_path / "other.json"
    LayerProfile(model={"name": "other", "num_layers": 8, "hidden_size": 9, "vocab_size": 3, "model_type": "x",
                        "fingerprint": 1.0}, corpus="test", texts=1, late_from=6,
                 layers=tuple(LayerScore(index, 0.1, 0.1) for index in range(8))).save(profile)
    with pytest.raises(UserError, match="profile"):
        attach_calibration(tiny, DecodeSettings(profile=str(profile), skip_order="importance"))
    assert session_of(tiny).loaded.calibration is None  # a model without a calibration: none attached
