"""`d3 serve`'s routes end to end: a real server process answering chat and completions as `d3 generate` would,
streamed or whole, to concurrent and batched clients, a client that leaves, and every bad request answered with an
OpenAI error naming the field (the server survives them all). The embedded model checks that served replies equal
`d3 generate`'s token for token."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from d3cli.core.calibration.model_calibration import BUNDLED_CALIBRATION, read_calibration
from d3cli.core.session.plan import plan_of
from d3cli.core.session.settings import DecodeSettings
from server.conftest import (
    PROMPT,
    REQUEST_TIMEOUT_S,
    TOO_LONG,
    ServeProcess,
    chat_reply,
    d3_of,
    open_stream,
    read_data_lines,
    request,
)

# --- the tiny-model server ----------------------------------------------------------------------------------------


def test_health_and_models(server, tiny_model_dir):
    assert request(server, "GET", "/health")[0] == 200
    assert [model.id for model in server.client().models.list()] == [str(tiny_model_dir)]


def test_chat_at_alpha_1_equals_generate_token_for_token(server, references, tiny_model_dir):
    reference = references(PROMPT, True, "--alpha", "1", "-n", "16")
    client = server.client()
    whole = client.chat.completions.create(model=str(tiny_model_dir), messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=16, extra_body={"alpha": 1})
    assert d3_of(whole)["token_ids"] == reference["token_ids"]
    assert whole.choices[0].message.content == reference["text"]
    assert whole.usage.prompt_tokens == reference["prompt_tokens"]
    assert whole.usage.completion_tokens == reference["generated_tokens"]

    chunks = list(client.chat.completions.create(
        messages=[{"role": "user", "content": PROMPT}], model=str(tiny_model_dir), max_completion_tokens=16,
        stream=True, stream_options={"include_usage": True}, extra_body={"alpha": 1.0}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == reference["text"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reference["generated_tokens"]
    assert chunks[-2].choices[0].finish_reason == {"eos": "stop"}.get(reference["finish_reason"],
                                                                      reference["finish_reason"])
    assert d3_of(chunks[-1])["token_ids"] == reference["token_ids"]
    assert len([chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content is not None]) in (
        reference["generated_tokens"], reference["generated_tokens"] - 1)  # one per token (EOS adds no text)


def test_completions_at_alpha_1_equal_generate_without_the_template(server, references, tiny_model_dir):
    reference = references("Once upon a time", False, "--alpha", "1", "-n", "12")
    client = server.client()
    whole = client.completions.create(model=str(tiny_model_dir), prompt="Once upon a time", max_tokens=12,
                                      extra_body={"alpha": 1})
    assert whole.choices[0].text == reference["text"] and d3_of(whole)["token_ids"] == reference["token_ids"]
    chunks = list(client.completions.create(model=str(tiny_model_dir), prompt="Once upon a time", max_tokens=12,
                                            stream=True, extra_body={"alpha": 1}))
    assert "".join(chunk.choices[0].text for chunk in chunks) == reference["text"]
    assert d3_of(chunks[-1])["token_ids"] == reference["token_ids"]


def test_a_request_sharing_the_templates_start_with_the_last_one_prefills_only_the_rest(server, references,
                                                                                         tiny_model_dir):
    """The prompt cache: the second request's usage and `d3` object count the tokens it reused, and its reply is
    still `d3 generate`'s (a process of its own, no cache)."""
    reference = references("Why is the sky blue?", True, "--alpha", "1", "-n", "10")
    client = server.client()
    chat_reply(client, "Tell me a story.", max_tokens=4, alpha=1, model=str(tiny_model_dir))
    again = chat_reply(client, "Why is the sky blue?", max_tokens=10, alpha=1, model=str(tiny_model_dir))
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens and d3_of(again)["cached_prompt_tokens"] == cached
    assert d3_of(again)["token_ids"] == reference["token_ids"] and reference["cached_prompt_tokens"] == 0
    record = server.wait_for_record(lambda record: record.get("cached_tokens") == cached)
    assert record["prompt_tokens"] == again.usage.prompt_tokens


def test_concurrent_clients_each_get_their_solo_reply(server):
    asks = [dict(prompt=f"Tell me about {topic}.", max_tokens=14, alpha=alpha, stream=stream)
            for topic, alpha, stream in [("cats", 1.0, False), ("dogs", 0.9, True), ("rain", 0.8, False),
                                         ("snow", 0.95, True), ("tea", 1.0, True), ("ink", 0.85, False)]]

    def ask(fields: dict) -> list[int]:
        fields = dict(fields)
        client = server.client()
        if fields.pop("stream"):
            chunks = list(chat_reply(client, stream=True, **fields))
            return d3_of(chunks[-1])["token_ids"]
        return d3_of(chat_reply(client, **fields))["token_ids"]

    solo = [ask(fields) for fields in asks]
    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(ask, asks))
    assert together == solo


def test_requests_that_wait_together_with_the_same_settings_share_a_batch(server):
    """With --batch-size 4: four greedy requests queued behind a busy worker are decoded as one batch, each reply
    complete, equal to its solo reply, with its own finish; a fifth with other settings waits for its own decode."""
    asks = [dict(prompt=f"Describe {thing}.", max_tokens=12, alpha=0.9)  # one batch_key: the same settings
            for thing in ["a river", "a hill", "a storm", "a bell"]]
    solo = [d3_of(chat_reply(server.client(), **ask))["token_ids"] for ask in asks]
    connection, response = open_stream(server, {"messages": [{"role": "user", "content": "Keep going."}],
                                                "max_tokens": 450})
    read_data_lines(response, 1)  # the worker is busy: what comes next waits in the queue
    with ThreadPoolExecutor(len(asks) + 1) as pool:
        together = [pool.submit(lambda ask: d3_of(chat_reply(server.client(), **ask)), ask) for ask in asks]
        other = pool.submit(lambda: d3_of(chat_reply(server.client(), prompt="Describe a bell.", max_tokens=12,
                                                     alpha=1)))
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while request(server, "GET", "/health")[1]["queued"] < len(asks) + 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        since = server.mark()
        connection.close()  # the busy request leaves; the four waiting ones go as one batch
        replies = [future.result(timeout=REQUEST_TIMEOUT_S) for future in together]
        assert other.result(timeout=REQUEST_TIMEOUT_S)["batch_size"] == 1
    assert [reply["batch_size"] for reply in replies] == [4, 4, 4, 4]
    assert [reply["token_ids"] for reply in replies] == solo
    server.wait_for_record(lambda record: record.get("disconnected"), since=since)  # logged before the next test


def test_a_client_that_disconnects_stops_its_decode_and_the_next_reply_is_exact(server, references):
    since = server.mark()
    connection, response = open_stream(server, {"messages": [{"role": "user", "content": "Count to a thousand."}],
                                                "max_tokens": 400, "alpha": 0.8, "min_layers": 3,
                                                "head": 1, "tail": 1})
    read_data_lines(response, 3)
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    record = server.wait_for_record(lambda record: record.get("disconnected"), since=since)
    assert record["status"] == 200 and 3 <= record["completion_tokens"] < 400
    assert record["steps_after_cancel"] is not None and record["steps_after_cancel"] <= 2

    reference = references(PROMPT, True, "--alpha", "1", "-n", "16")
    assert d3_of(chat_reply(server.client(), max_tokens=16, alpha=1))["token_ids"] == reference["token_ids"]


def test_a_tiny_temperature_is_answered_and_the_next_reply_is_exact(server, references):
    """A temperature so small that logits / temperature overflows once made the sampler produce NaN and the decode
    fail: it now samples the greedy token (the worker's own tests fail decodes on purpose and check the model after)."""
    greedy = references(PROMPT, True, "--alpha", "1", "-n", "8")
    for stream in (False, True):
        reply = chat_reply(server.client(), max_tokens=8, temperature=1e-300, seed=3, alpha=1, stream=stream)
        tokens = ([token for chunk in reply for token in (chunk.model_extra.get("d3") or {}).get("token_ids", [])]
                  if stream else d3_of(reply)["token_ids"])
        assert tokens == greedy["token_ids"]
    reference = references(PROMPT, True, "--alpha", "1", "-n", "16")
    assert d3_of(chat_reply(server.client(), max_tokens=16, alpha=1))["token_ids"] == reference["token_ids"]


BAD_REQUESTS = [
    # (method, path, body, status, param)
    ("POST", "/v1/chat/completions", b"{not json", 400, None),
    ("POST", "/v1/chat/completions", b'{"messages": [], "alpha": Infinity}', 400, None),
    ("POST", "/v1/chat/completions", b"[]", 400, None),
    ("POST", "/v1/chat/completions", {"prompt": "hi"}, 400, "prompt"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function",
     "function": {"name": "f"}}]}, 400, "tools"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400,
     "logprobs"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "alpha": 1.5}, 400, "alpha"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "min_layers": 9}, 400,
     "min_layers"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "skip_order": "importance"},
     400, "skip_order"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400,
     "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     "temperature"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404,
     "model"),
    ("POST", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("POST", "/v1/completions", TOO_LONG, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "hi", "stop": [1]}, 400, "stop"),
    ("GET", "/v1/chat/completions", None, 405, None),
    ("GET", "/v1/nothing", None, 404, None),
]


@pytest.mark.parametrize("method, path, body, status, param", BAD_REQUESTS)
def test_bad_requests_get_an_openai_error_naming_the_field(server, method, path, body, status, param):
    got, answer = request(server, method, path, body)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error"


def test_a_body_over_the_limit_is_413(server):
    status, answer = request(server, "POST", "/v1/completions",
                             json.dumps({"prompt": "x" * (2 * 1024 * 1024)}).encode())
    assert status == 413 and answer["error"]["code"] == "request_too_large"


def test_a_body_nested_too_deeply_is_400_invalid_json(server):
    status, answer = request(server, "POST", "/v1/chat/completions", b"[" * 100_000)
    assert status == 400 and answer["error"]["code"] == "invalid_json", answer
    assert "nested too deeply" in answer["error"]["message"]


def test_the_server_survived_every_bad_request_and_logged_each(server):
    assert request(server, "GET", "/health")[0] == 200
    requests = [record for record in server.records() if record.get("event") == "request"]
    assert {record["status"] for record in requests} >= {200, 400, 404, 405, 413}
    served = next(record for record in requests if record["status"] == 200 and "completion_tokens" in record)
    assert {"method", "path", "prompt_tokens", "completion_tokens", "mean_layers", "tokens_per_s", "time_s",
            "time"} <= set(served)
    assert server.process.poll() is None


# --- a queue of one -----------------------------------------------------------------------------------------------


def test_a_full_queue_answers_503(guarded_server):
    auth = {"Authorization": "Bearer sesame"}
    connection, response = open_stream(guarded_server, {"messages": [{"role": "user", "content": "Go on and on."}],
                                                        "max_tokens": 450}, auth)
    read_data_lines(response, 1)  # the worker is busy with this one
    waiting: list = []
    waiter = threading.Thread(target=lambda: waiting.append(request(
        guarded_server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3}, auth)))
    waiter.start()
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while request(guarded_server, "GET", "/health")[1]["queued"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status, answer = request(guarded_server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3}, auth)
    assert status == 503 and answer["error"]["code"] == "queue_full"
    connection.close()  # the client leaves: its decode stops and the waiting request runs
    waiter.join(REQUEST_TIMEOUT_S)
    assert waiting[0][0] == 200 and waiting[0][1]["usage"]["completion_tokens"] == 3
    guarded_server.wait_for_line(lambda line: "POST /v1/completions 503" in line)
    guarded_server.wait_for_line(lambda line: "client left" in line)


# --- the embedded model -------------------------------------------------------------------------------------------


@pytest.mark.embedded
def test_embedded_served_replies_equal_d3_generate(cli, tmp_path):
    """At the defaults (the bundled calibration's schedule: full depth) the served reply is `d3 generate`'s, token
    for token, streamed or not; with a request's α and floor (the calibration's order and bridges) it is `d3 generate
    --alpha --min-layers`'s, layer counts included; the `d3` object says where the schedule came from."""
    process = ServeProcess([], tmp_path)
    try:
        client = process.client()
        skipping = (["--alpha", "0.98", "--min-layers", "25"], {"alpha": 0.98, "min_layers": 25})
        for options, extra in (([], {}), skipping):
            generated = cli(["generate", "--json", "-n", "24", *options, PROMPT])
            assert generated.exit_code == 0, generated.stderr
            reference = json.loads(generated.stdout)
            whole = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=24, extra_body=extra,
                                                   messages=[{"role": "user", "content": PROMPT}])
            assert d3_of(whole)["token_ids"] == reference["token_ids"]
            assert d3_of(whole)["layers_per_token"] == reference["layers_per_token"]
            assert whole.choices[0].message.content == reference["text"]
            chunks = list(client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=24, stream=True,
                                                         extra_body=extra,
                                                         messages=[{"role": "user", "content": PROMPT}]))
            assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == reference["text"]
            assert d3_of(chunks[-1])["token_ids"] == reference["token_ids"]
            assert d3_of(whole)["schedule_source"] == reference["schedule_source"] == (
                "option" if extra else "calibration")
            if not extra:
                assert set(reference["layers_per_token"]) == {30}
        calibration = read_calibration(BUNDLED_CALIBRATION)
        schedule = plan_of(DecodeSettings(alpha=0.98, min_layers=25), 30, calibration).schedule
        layers = reference["layers_per_token"]
        assert layers == [schedule.layers_at(index) for index in range(len(layers))] and min(layers) < 30
    finally:
        process.kill()
