"""What `d3 serve` holds between requests (state.py): each request's token ids checked against the context and its
plan (the request's schedule, its reply length clamped to the context), end to end through a real server process,
and directly on a ServerState that loads the tiny model in this process."""

from __future__ import annotations

import pytest

from d3cli.core.model.loader import ModelOptions
from d3cli.core.session.plan import plan_of
from d3cli.core.session.settings import DecodeSettings
from d3cli.core.text.prompts import encode_chat, encode_prompt
from d3cli.server import protocol
from d3cli.server.protocol import CHAT, COMPLETION, ApiError, CompletionRequest
from d3cli.server.state import ServeConfig, ServerState
from server.conftest import TOO_LONG, chat_reply, d3_of, request

# --- through the tiny-model server --------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [{}, {"alpha": 0.8, "min_layers": 3, "head": 1, "tail": 1}])
def test_layers_per_token_follow_the_schedule(server, depth):
    response = chat_reply(server.client(), max_tokens=20, **depth)
    layers = d3_of(response)["layers_per_token"]
    schedule = plan_of(DecodeSettings(**depth), 8).schedule
    assert layers == [schedule.layers_at(index) for index in range(len(layers))]
    if depth:
        assert min(layers) == 3 and d3_of(response)["mean_layers"] == pytest.approx(sum(layers) / len(layers), 1e-3)


def test_max_tokens_beyond_the_context_is_clamped(server):
    completion = server.client().completions.create(model="", prompt="sea " * 490, max_tokens=100_000)
    assert completion.usage.total_tokens == 512  # the tiny model's context
    assert completion.choices[0].finish_reason == "length"


def test_a_too_long_prompt_says_so(server):
    status, answer = request(server, "POST", "/v1/completions", TOO_LONG)
    assert answer["error"]["code"] == "context_length_exceeded" and "context of 512 tokens" in answer["error"][
        "message"]


# --- a ServerState in this process --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state(tiny_model_dir):
    """The tiny model loaded as `d3 serve` loads it (here on this thread), its worker started."""
    records = []
    loaded = ServerState(ServeConfig(ModelOptions(model=str(tiny_model_dir)), DecodeSettings(head=1, tail=1)),
                         records.append)
    assert loaded.loaded is None and not loaded.ready.is_set()
    loaded.load()
    loaded.records = records
    yield loaded
    loaded.stop()


def completion(prompt: str, **settings) -> CompletionRequest:
    return CompletionRequest(COMPLETION, DecodeSettings(head=1, tail=1, **settings), prompt=prompt)


def refused(call, request) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(request)
    return caught.value


def test_loading_opens_the_model_starts_the_worker_and_says_ready(state, tiny_model_dir):
    assert state.ready.is_set() and state.load_error is None and state.worker is not None
    assert state.model_ids == (str(tiny_model_dir),) and state.num_layers == 8
    (ready,) = state.records
    assert {key: ready[key] for key in ("event", "model", "num_layers")} == {
        "event": "ready", "model": str(tiny_model_dir), "num_layers": 8}
    assert state.tokenizer is not state.session.tokenizer  # the request side's own copy
    assert state.worker.prefix is not None  # the prompt cache is on by default


def test_without_the_prompt_cache_the_worker_keeps_nothing(tiny_model_dir):
    config = ServeConfig(ModelOptions(model=str(tiny_model_dir)), DecodeSettings(), prompt_cache=False)
    unkept = ServerState(config, lambda record: None)
    unkept.load()
    try:
        assert unkept.worker.prefix is None
    finally:
        unkept.stop()


def test_prompt_ids_are_the_chat_template_or_the_raw_text(state):
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."})
    chat = CompletionRequest(CHAT, DecodeSettings(), messages=messages)
    assert state.prompt_ids(chat) == encode_chat(state.session.tokenizer, list(messages))
    assert state.prompt_ids(completion("Once upon a time")) == encode_prompt(state.session.tokenizer,
                                                                            "Once upon a time", chat=False)


@pytest.mark.parametrize("endpoint, param", [(COMPLETION, "prompt"), (CHAT, "messages")])
def test_a_prompt_longer_than_the_context_is_a_400_context_length_exceeded(state, endpoint, param):
    request = (completion("sea " * 600) if endpoint == COMPLETION else
               CompletionRequest(CHAT, DecodeSettings(), messages=({"role": "user", "content": "sea " * 600},)))
    error = refused(state.prompt_ids, request)
    assert (error.status, error.param, error.code) == (400, param, "context_length_exceeded")
    tokens = len(encode_prompt(state.session.tokenizer, "sea " * 600, chat=endpoint == CHAT))
    assert error.message == f"{param}: the prompt is {tokens} tokens, longer than the model's context of 512 tokens"
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_an_empty_prompt_is_a_400_invalid_value(state):
    error = refused(state.prompt_ids, completion(" \n "))
    assert (error.status, error.param, error.code, error.message) == (400, "prompt", "invalid_value",
                                                                      "prompt: the prompt is empty")


def test_a_request_that_changes_nothing_takes_the_sessions_own_plan(state):
    assert state.plan(completion("Hi")) is state.session.plan
    changed = state.plan(completion("Hi", alpha=0.8, min_layers=3))
    expected = plan_of(DecodeSettings(head=1, tail=1, alpha=0.8, min_layers=3), 8).schedule
    assert [changed.schedule.layers_at(step) for step in range(12)] == [expected.layers_at(step) for step in range(12)]


def test_a_schedule_that_does_not_fit_the_model_is_the_requests_400(state):
    request = protocol.parse_request(COMPLETION, {"prompt": "Hi", "min_layers": 40}, DecodeSettings(head=1, tail=1),
                                     state.model_ids)
    error = refused(state.plan, request)
    assert (error.status, error.param) == (400, "min_layers") and "8 layers" in error.message


def test_a_model_that_cannot_load_is_one_line_and_stops_the_server(tmp_path):
    stopped, records = [], []
    missing = ServerState(ServeConfig(ModelOptions(model=str(tmp_path / "nothing")), DecodeSettings()), records.append)
    missing.on_load_failed = lambda: stopped.append(True)
    missing.load()
    assert missing.load_error == f"no such file or folder: {tmp_path / 'nothing'}"
    assert stopped == [True] and records == [] and not missing.ready.is_set()
    assert missing.loaded is None and missing.worker is None
    missing.stop()  # nothing to stop: no error
    missing.cancel_all()
