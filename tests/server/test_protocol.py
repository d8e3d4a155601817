"""d3 serve's protocol: request bodies checked into settings (errors name the field), responses and stream chunks
in the OpenAI schema (checked with the openai package's own models). No model, no server."""

from __future__ import annotations

import pytest

from d3cli.base.errors import UserError
from d3cli.core.session.plan import plan_of
from d3cli.core.session.settings import DecodeSettings
from d3cli.server import protocol
from d3cli.server.protocol import CHAT, COMPLETION, ApiError

MODEL = "tiny"
BASE = DecodeSettings()
HELLO = [{"role": "user", "content": "Hello"}]


def chat(**fields):
    return protocol.parse_request(CHAT, {"messages": HELLO, **fields}, BASE, (MODEL, "tiny (alias)"))


def refused(endpoint=CHAT, **fields) -> ApiError:
    body = {"messages": HELLO} if endpoint == CHAT else {"prompt": "Hello"}
    body.update(fields)
    with pytest.raises(ApiError) as caught:
        protocol.parse_request(endpoint, {key: value for key, value in body.items() if value is not ...}, BASE,
                               (MODEL,))
    return caught.value


def test_a_minimal_chat_request_takes_the_servers_settings():
    request = chat()
    assert request.endpoint == CHAT and request.messages == ({"role": "user", "content": "Hello"},)
    assert request.settings == BASE and not request.stream and not request.include_usage


def test_openai_fields_and_d3_fields_become_decode_settings():
    request = chat(model="tiny (alias)", max_tokens=12, temperature=0.7, top_p=0.9, seed=3, stop="END",
                   alpha=0.9, min_layers="0.5", warmup=2, head=1, tail=1, skip_order="late", bridges=False, top_k=5,
                   stream=True, stream_options={"include_usage": True}, user="me", metadata={"a": "b"})
    settings = request.settings
    assert settings.max_new_tokens == 12 and settings.stop == ("END",)
    assert (settings.sampling.temperature, settings.sampling.top_p, settings.sampling.seed,
            settings.sampling.top_k) == (0.7, 0.9, 3, 5)
    assert (settings.alpha, settings.min_layers, settings.warmup, settings.head, settings.tail) == (0.9, 0.5, 2, 1, 1)
    assert settings.skip_order == "late" and settings.bridges is False
    assert request.stream and request.include_usage and set(request.d3_fields) >= {"alpha", "min_layers"}
    assert request == chat(model="tiny (alias)", max_tokens=12, temperature=0.7, top_p=0.9, seed=3, stop="END",
                           alpha=0.9, min_layers="0.5", warmup=2, head=1, tail=1, skip_order="late", bridges=False,
                           top_k=5, stream=True, stream_options={"include_usage": True})  # user, metadata: ignored


def test_max_completion_tokens_wins_over_max_tokens_and_stop_lists_are_kept():
    request = chat(max_tokens=50, max_completion_tokens=7, stop=["a", "bc"])
    assert request.settings.max_new_tokens == 7 and request.settings.stop == ("a", "bc")


def test_greedy_requests_may_carry_top_p_as_openai_clients_do():
    request = chat(temperature=0, top_p=0.5, top_k=3)
    assert request.settings.sampling.greedy and request.settings.sampling.top_p == 1.0


def test_chat_content_parts_and_developer_role():
    request = protocol.parse_request(CHAT, {"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
    ]}, BASE, (MODEL,))
    assert request.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"})


def test_a_completion_prompt_may_be_a_one_element_list():
    request = protocol.parse_request(COMPLETION, {"prompt": ["Once upon"]}, BASE, (MODEL,))
    assert request.prompt == "Once upon" and request.endpoint == COMPLETION


@pytest.mark.parametrize("fields, status, param, words", [
    ({"n": 2}, 400, "n", "one reply per request"),
    ({"n": 1, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "tool calling"),
    ({"logprobs": True}, 400, "logprobs", "log probabilities"),
    ({"top_logprobs": 2}, 400, "top_logprobs", "log probabilities"),
    ({"frequency_penalty": 0.5}, 400, "frequency_penalty", "penalties"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format", "plain text"),
    ({"model": "gpt-4o"}, 404, "model", "'tiny'"),
    ({"model": 3}, 400, "model", "must be a string"),
    ({"alhpa": 0.9}, 400, "alhpa", "did you mean 'alpha'"),
    ({"alpha": 0}, 400, "alpha", "(0, 1]"),
    ({"alpha": "fast"}, 400, "alpha", "alpha must be"),
    ({"min_layers": -1}, 400, "min_layers", "min_layers must be >= 0"),
    ({"min_layers": 1.5}, 400, "min_layers", "[0, 1]"),
    ({"skip_order": "random"}, 400, "skip_order", "unknown skip order"),
    ({"warmup": -2}, 400, "warmup", "warmup"),
    ({"bridges": "yes"}, 400, "bridges", "bool"),
    ({"max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ({"max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ({"max_completion_tokens": True}, 400, "max_completion_tokens", "integer"),
    ({"temperature": -1}, 400, "temperature", ">= 0"),
    ({"temperature": 1, "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ({"seed": "x"}, 400, "seed", "int"),
    ({"seed": 2**64}, 400, "seed", "64 bits"),
    ({"stop": 5}, 400, "stop", "string or a list of strings"),
    ({"stop": ["ok", ""]}, 400, "stop", "empty"),
    ({"stream": "yes"}, 400, "stream", "boolean"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", "stream: true"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, 400, "include_usage", "boolean"),
    ({"messages": ...}, 400, "messages", "required"),
    ({"messages": "hi"}, 400, "messages", "must be a list"),
    ({"messages": []}, 400, "messages", "must not be empty"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "one of"),
    ({"messages": [{"role": "tool", "content": "{}"}]}, 400, "messages[0].role", "tool"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content[0]",
     "text only"),
    ({"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content", "string or a list"),
])
def test_bad_chat_fields_are_refused_naming_the_field(fields, status, param, words):
    error = refused(**fields)
    assert (error.status, error.param) == (status, param)
    assert words in error.message
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"


@pytest.mark.parametrize("fields, param, words", [
    ({"prompt": ...}, "prompt", "required"),
    ({"prompt": ["a", "b"]}, "prompt", "one per request"),
    ({"prompt": [1, 2, 3]}, "prompt", "must be a string"),
    ({"echo": True}, "echo", "echo"),
    ({"best_of": 3}, "best_of", "best_of"),
    ({"logprobs": 2}, "logprobs", "log probabilities"),
    ({"max_completion_tokens": 3}, "max_completion_tokens", "unknown field"),
])
def test_bad_completion_fields_are_refused_naming_the_field(fields, param, words):
    error = refused(COMPLETION, **fields)
    assert (error.status, error.param) == (400, param) and words in error.message


def test_neutral_values_of_unsupported_fields_are_accepted():
    """They ask for nothing, so the request is the one without them: same settings, messages, stream and fields."""
    assert chat(n=1, tools=[], tool_choice="none", logprobs=False, frequency_penalty=0.0, presence_penalty=0,
                logit_bias={}, response_format={"type": "text"}, parallel_tool_calls=True) == chat()
    assert chat(n=None, top_logprobs=0, functions=[], function_call="none", audio=None, prediction=None) == chat()


IGNORED_FIELDS = {"user": "me", "metadata": {"a": "b"}, "store": True, "service_tier": "flex",
                  "parallel_tool_calls": False, "prompt_cache_key": "k", "safety_identifier": "s",
                  "modalities": ["text"], "reasoning_effort": "high", "verbosity": "low",
                  "web_search_options": {}}


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETION])
def test_ignored_fields_change_nothing_about_the_request(endpoint):
    """`user`, `metadata`, `store`... are accepted and have no effect: the request parsed from a body with them equals
    the one parsed from the same body without them, down to its settings."""
    assert set(IGNORED_FIELDS) == set(protocol.IGNORED)
    body = {"messages": HELLO} if endpoint == CHAT else {"prompt": "Hello"}
    body.update(max_tokens=12, temperature=0.7, seed=3, stop="END", alpha=0.9, stream=True,
                stream_options={"include_usage": True})
    plain = protocol.parse_request(endpoint, body, BASE, (MODEL,))
    with_ignored = protocol.parse_request(endpoint, {**body, **IGNORED_FIELDS}, BASE, (MODEL,))
    assert with_ignored == plain
    assert with_ignored.settings == plain.settings and with_ignored.settings != BASE
    assert with_ignored.d3_fields == ("alpha",)


@pytest.mark.parametrize("raw, words", [
    (b"{", "not valid JSON"),
    (b'{"alpha": NaN}', "not valid JSON (NaN is not a JSON number"),
    (b"[1, 2]", "must be a JSON object, not a list"),
    (b"", "empty"),
    (b'{"a": "\xff"}', "not valid UTF-8"),
    (b'{"prompt": "a\\ud800b"}', "lone surrogate"),
])
def test_a_body_that_is_not_a_json_object_is_refused(raw, words):
    with pytest.raises(ApiError) as caught:
        protocol.parse_json_body(raw)
    assert caught.value.status == 400 and words in caught.value.message


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"prompt": "hi", "x": ' + b'{"a": ' * 100_000])
def test_a_body_nested_too_deeply_is_invalid_json_not_a_crash(raw):
    with pytest.raises(ApiError) as caught:
        protocol.parse_json_body(raw)
    assert (caught.value.status, caught.value.code) == (400, "invalid_json")
    assert "nested too deeply" in caught.value.message


def test_a_schedule_that_does_not_fit_the_model_names_the_field():
    request = chat(min_layers=40)
    with pytest.raises(UserError) as caught:
        plan_of(request.settings, 8)
    error = protocol.schedule_error(caught.value, request)
    assert (error.status, error.param) == (400, "min_layers") and "8 layers" in error.message


# --- responses ----------------------------------------------------------------------------------------------------
