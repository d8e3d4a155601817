"""A reply's settings: built from command-line options or JSON-style options, checked once with the options' words,
turned back into options without loss, and the variants other parts ask for (full depth, the batch key)."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

import pytest

from d3cli.base.errors import UserError
from d3cli.core.decode.sampling import SamplingSettings
from d3cli.core.session.plan import plan_of
from d3cli.core.session.settings import (
    VALUE_CHECKS,
    DecodeSettings,
    apply_options,
    did_you_mean,
    json_type,
    settings_as_options,
)

BASE = DecodeSettings()
SET = DecodeSettings(alpha=0.9, min_layers=0.5, warmup=2, head=1, tail=3, skip_order="late", max_new_tokens=40,
                     sampling=SamplingSettings(temperature=0.7, top_k=20, top_p=0.9, seed=5), stop=("END", "\n\n"),
                     chat=True, system="Be brief.", bridges=False)


def refused(base: DecodeSettings = BASE, **options) -> str:
    with pytest.raises(UserError) as caught:
        apply_options(base, options)
    return str(caught.value)


def test_the_defaults_leave_alpha_and_the_floor_to_the_model():
    assert (BASE.alpha, BASE.min_layers, BASE.profile, BASE.calibration, BASE.chat, BASE.system) == (None,) * 6
    assert (BASE.warmup, BASE.head, BASE.tail, BASE.skip_order, BASE.max_new_tokens) == (0, 2, 2, "auto", 256)
    assert BASE.sampling == SamplingSettings() and BASE.sampling.greedy and BASE.stop == () and BASE.bridges is True


@pytest.mark.parametrize("fields, message", [
    (dict(max_new_tokens=0), "max-new-tokens must be at least 1, not 0"),
    (dict(max_new_tokens=2.0), "max-new-tokens must be a whole number, not 2.0"),
    (dict(chat=False, system="Be brief."), "--system needs the chat template; it cannot be combined with --no-chat"),
    (dict(profile="layers.json", skip_order="middle"),
     "--profile is used by --skip-order importance only, not with skip order 'middle'"),
    (dict(bridges="yes"), "bridges must be true or false, not 'yes'"),
    (dict(warmup=-1), "warmup must be a whole number of tokens >= 0, not -1"),
])
def test_settings_that_cannot_be_are_refused_when_built(fields, message):
    with pytest.raises(UserError) as caught:
        DecodeSettings(**fields)
    assert str(caught.value) == message


def test_a_profile_goes_with_the_importance_order_or_auto():
    assert DecodeSettings(profile="p.json", skip_order="importance").profile == "p.json"
    assert DecodeSettings(profile="p.json").skip_order == "auto"


def test_command_line_options_become_settings():
    class Order(str, enum.Enum):
        late = "late"

    settings = DecodeSettings.from_options(
        alpha=0.9, min_layers="0.5", warmup=2, head="1", tail="3", skip_order=Order.late, max_new_tokens=40,
        temperature=0.7, top_k=20, top_p=0.9, seed=5, stop=["END", "\n\n"], chat=True, system="Be brief.",
        bridges=False)
    assert settings == SET
    assert DecodeSettings.from_options(
        alpha=None, min_layers=None, warmup=0, head="2", tail="2", skip_order="importance", max_new_tokens=256,
        temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=None, profile=Path("p.json"),
        calibration=Path("c.json")) == DecodeSettings(skip_order="importance", profile="p.json", calibration="c.json")


def test_full_depth_keeps_the_reply_and_drops_every_skip():
    full = SET.full_depth()
    assert (full.alpha, full.min_layers, full.warmup, full.skip_order, full.profile, full.bridges) == (
        1.0, 1.0, 0, "middle", None, False)
    assert (full.max_new_tokens, full.sampling, full.stop, full.chat, full.system) == (
        SET.max_new_tokens, SET.sampling, SET.stop, SET.chat, SET.system)
    assert plan_of(full, 8).schedule.is_full_depth()
    assert not plan_of(SET, 8).schedule.is_full_depth()


def test_replies_share_a_batch_key_when_only_the_prompt_format_differs():
    assert SET.batch_key() == dataclasses.replace(SET, chat=None, system=None).batch_key()
    assert SET.batch_key() == dataclasses.replace(SET, chat=False, system=None).batch_key()
    assert SET.batch_key() != dataclasses.replace(SET, max_new_tokens=41).batch_key()
    assert SET.batch_key() != dataclasses.replace(SET, sampling=SamplingSettings(temperature=0.7, seed=6)).batch_key()
    assert SET.batch_key() != dataclasses.replace(SET, stop=("END",)).batch_key()


def test_options_round_trip_through_their_json_form():
    options = settings_as_options(SET)
    assert options["stop"] == ["END", "\n\n"] and options["seed"] == 5 and "sampling" not in options
    assert apply_options(BASE, options) == SET
    assert apply_options(SET, settings_as_options(BASE)) == BASE


def test_options_change_only_what_they_name():
    changed = apply_options(SET, {"temperature": 1.2, "min_layers": "5", "stop": "STOP", "alpha": None})
    assert changed.sampling == SamplingSettings(temperature=1.2, top_k=20, top_p=0.9, seed=5)
    assert (changed.min_layers, changed.stop, changed.alpha) == (5, ("STOP",), None)  # null: back to "not set"
    assert dataclasses.replace(changed, sampling=SET.sampling, min_layers=0.5, stop=SET.stop, alpha=0.9) == SET
    assert apply_options(SET, {}) == SET


@pytest.mark.parametrize("options, message", [
    ({"alpah": 0.9}, "unknown key 'alpah' (did you mean 'alpha'?)"),
    ({"zzz": 1}, "unknown key 'zzz'"),
    ({"warmup": 1.5}, "key 'warmup' must be int, not a number"),
    ({"warmup": None}, "key 'warmup' must be int, not null"),
    ({"max_new_tokens": True}, "key 'max_new_tokens' must be int, not a boolean"),
    ({"alpha": "fast"}, "key 'alpha' must be int or float, not a string"),
    ({"chat": 1}, "key 'chat' must be bool, not an integer"),
    ({"stop": {"a": 1}}, "key 'stop' must be str or list, not an object"),
    ({"stop": ["ok", 1]}, "key 'stop' must be a string or a list of strings"),
    ({"max_new_tokens": 0}, "max-new-tokens must be at least 1, not 0"),
    ({"top_p": 1.5, "temperature": 1}, "top-p must lie in (0, 1], not 1.5"),
    ({"min_layers": True}, "key 'min_layers' must be int or float or str, not a boolean"),
    ({"min_layers": "many"}, "min-layers must be a whole number of layers or a fraction of them like 0.5, not 'many'"),
])
def test_a_bad_option_is_refused_naming_the_key_or_the_value(options, message):
    assert refused(**options) == message


def test_the_callers_own_keys_are_offered_as_suggestions():
    with pytest.raises(UserError, match=r"^unknown key 'promt' \(did you mean 'prompt'\?\)$"):
        apply_options(BASE, {"promt": "Hi"}, extra_keys=("prompt", "id"))


def test_json_types_are_named_as_json_names_them():
    assert [json_type(value) for value in (True, 1, 1.5, "a", [], {}, None)] == [
        "a boolean", "an integer", "a number", "a string", "a list", "an object", "null"]
    assert json_type((1,)) == "tuple"
    assert did_you_mean("tempreature", ["temperature", "top_p"]) == " (did you mean 'temperature'?)"
    assert did_you_mean("xyz", ["temperature"]) == ""


@pytest.mark.parametrize("key, bad, good", [("alpha", 0, 0.5), ("warmup", -1, 3), ("max_new_tokens", 0, 1),
                                            ("temperature", -1, 0), ("top_k", -1, 0), ("top_p", 0, 1)])
def test_each_value_check_is_the_one_the_settings_use(key, bad, good):
    """A configuration file's values go through VALUE_CHECKS (cli/config.py): the same words as a JSON option's."""
    assert VALUE_CHECKS[key](good) is None
    with pytest.raises(UserError) as direct:
        VALUE_CHECKS[key](bad)
    sampling = {"temperature": 1} if key in ("top_k", "top_p") else {}
    assert refused(**{key: bad}, **sampling) == str(direct.value)
