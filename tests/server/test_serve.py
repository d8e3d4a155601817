"""`d3 serve` end to end: a real server process on a free loopback port, driven by the official openai client and
by raw HTTP. One tiny-model server answers most tests (no restart between them); a second one has an API key and
a queue of one; the embedded model checks that served replies equal `d3 generate`'s token for token."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from conftest import d3_executable

from d3cli.core.calibration.model_calibration import BUNDLED_CALIBRATION, read_calibration
from d3cli.core.session.plan import plan_of
from d3cli.core.session.settings import DecodeSettings

START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 120
PROMPT = "Write a short poem about the sea."


class ServeProcess:
    """`d3 serve --port 0 ARGS` in a child process; its stderr read on a thread (JSON records, or text lines)."""

    def __init__(self, args: list[str], cwd: Path, log_format: str = "json", wait_until_ready: bool = True):
        self.log_format = log_format
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.process = subprocess.Popen(
            [d3_executable(), "serve", "--port", "0", "--log-format", log_format, *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd,
        )
        threading.Thread(target=self._read, daemon=True).start()
        try:
            listening = self.wait_for_line(lambda line: "listening" in line, START_TIMEOUT_S)
            if log_format == "json":
                self.port = json.loads(listening)["port"]
            else:
                self.port = int(listening.split("http://127.0.0.1:")[1].split()[0])
            self.url = f"http://127.0.0.1:{self.port}"
            if wait_until_ready:
                self.wait_for_line(lambda line: "ready" in line, START_TIMEOUT_S)
        except BaseException:
            self.kill()
            raise

    def _read(self) -> None:
        for line in self.process.stderr:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def mark(self) -> int:
        """Where the log is now: wait_for_line(..., since=mark) looks only at what comes after."""
        with self.changed:
            return len(self.lines)

    def wait_for_line(self, predicate, timeout_s: float = REQUEST_TIMEOUT_S, since: int = 0) -> str:
        deadline = time.monotonic() + timeout_s
        seen = since
        with self.changed:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None and seen == len(self.lines):
                    raise AssertionError("no such log line; the server wrote:\n" + "\n".join(self.lines))
                self.changed.wait(min(left, 0.5))

    def records(self) -> list[dict]:
        with self.changed:
            return [json.loads(line) for line in self.lines if line.startswith("{")]

    def wait_for_record(self, predicate, timeout_s: float = REQUEST_TIMEOUT_S, since: int = 0) -> dict:
        return json.loads(self.wait_for_line(lambda line: line.startswith("{") and predicate(json.loads(line)),
                                             timeout_s, since))

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=REQUEST_TIMEOUT_S)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


def request(server: ServeProcess, method: str, path: str, body: bytes | dict | None = None,
            headers: dict | None = None) -> tuple[int, dict]:
    """One raw HTTP request; the status and the JSON body."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def open_stream(server: ServeProcess, body: dict, headers: dict | None = None):
    """A streamed chat completion, left open: the connection and its response."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S)
    connection.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}).encode(),
                       headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    assert response.status == 200
    return connection, response


def read_data_lines(response, count: int) -> list[str]:
    lines = []
    while len(lines) < count:
        line = response.readline().decode()
        assert line, "the stream ended early"
        if line.startswith("data: "):
            lines.append(line[len("data: "):].strip())
    return lines


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    process = ServeProcess(["--model", str(tiny_model_dir), "--queue-size", "8", "--batch-size", "4"],
                           tmp_path_factory.mktemp("serve"))
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def guarded_server(tiny_model_dir, tmp_path_factory):
    process = ServeProcess(["--model", str(tiny_model_dir), "--queue-size", "1", "--api-key", "sesame"],
                           tmp_path_factory.mktemp("serve-guarded"), log_format="rich")
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def references(tiny_model_dir):
    """`d3 generate --json` replies of the tiny model, by (prompt, chat, extra options), made in this process."""
    from conftest import invoke

    made: dict[tuple, dict] = {}

    def reference(prompt: str, chat: bool = True, *options: str) -> dict:
        key = (prompt, chat, options)
        if key not in made:
            result = invoke(["generate", "--model", str(tiny_model_dir), "--json", "--chat" if chat else "--no-chat",
                             *options, prompt])
            assert result.exit_code == 0, result.stderr
            made[key] = json.loads(result.stdout)
        return made[key]

    return reference


def chat_reply(client: openai.OpenAI, prompt: str = PROMPT, **fields):
    extra = {key: fields.pop(key) for key in list(fields) if key in ("alpha", "min_layers", "head", "tail",
                                                                      "warmup", "skip_order", "bridges", "top_k")}
    return client.chat.completions.create(model=fields.pop("model", ""), messages=[
        {"role": "user", "content": prompt}], extra_body=extra or None, **fields)


def d3_of(response) -> dict:
    return response.model_extra["d3"]


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


@pytest.mark.parametrize("depth", [{}, {"alpha": 0.8, "min_layers": 3, "head": 1, "tail": 1}])
def test_layers_per_token_follow_the_schedule(server, depth):
    response = chat_reply(server.client(), max_tokens=20, **depth)
    layers = d3_of(response)["layers_per_token"]
    schedule = plan_of(DecodeSettings(**depth), 8).schedule
    assert layers == [schedule.layers_at(index) for index in range(len(layers))]
    if depth:
        assert min(layers) == 3 and d3_of(response)["mean_layers"] == pytest.approx(sum(layers) / len(layers), 1e-3)


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


def test_max_tokens_beyond_the_context_is_clamped(server):
    completion = server.client().completions.create(model="", prompt="sea " * 490, max_tokens=100_000)
    assert completion.usage.total_tokens == 512  # the tiny model's context
    assert completion.choices[0].finish_reason == "length"


TOO_LONG = {"prompt": "sea " * 600}
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


def test_a_too_long_prompt_says_so(server):
    status, answer = request(server, "POST", "/v1/completions", TOO_LONG)
    assert answer["error"]["code"] == "context_length_exceeded" and "context of 512 tokens" in answer["error"][
        "message"]


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


# --- API key, a queue of one, Ctrl-C ------------------------------------------------------------------------------


def test_an_api_key_is_required_when_set(guarded_server):
    with pytest.raises(openai.AuthenticationError) as caught:
        guarded_server.client("wrong").models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    assert request(guarded_server, "POST", "/v1/completions", {"prompt": "hi"})[0] == 401
    assert request(guarded_server, "GET", "/health")[0] == 200  # for load balancers and scripts: no key
    reply = chat_reply(guarded_server.client("sesame"), max_tokens=3)
    assert reply.usage.completion_tokens == 3


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


def test_health_is_503_while_the_model_loads_then_200_and_ctrl_c_stops_without_a_traceback(tiny_model_dir,
                                                                                              tmp_path):
    process = ServeProcess(["--model", str(tiny_model_dir)], tmp_path, wait_until_ready=False)
    try:
        # uvicorn answers before the model has loaded (importing torch alone takes over a second)
        assert request(process, "GET", "/health") == (503, {"status": "loading"})
        status, answer = request(process, "POST", "/v1/completions", {"prompt": "hi"})
        assert status == 503 and answer["error"]["code"] == "model_loading"
        process.wait_for_line(lambda line: "ready" in line, START_TIMEOUT_S)
        assert request(process, "GET", "/health")[0] == 200

        connection, response = open_stream(process, {"messages": [{"role": "user", "content": "Talk."}],
                                                     "max_tokens": 450})
        read_data_lines(response, 1)
        process.process.send_signal(signal.SIGINT)
        rest = response.read().decode()  # the stream ends now, with an error event, not after 450 tokens
        assert rest.rstrip().endswith("data: [DONE]") and "shutting down" in rest
        assert process.process.wait(timeout=60) in (0, 130)
        connection.close()
        assert not any("Traceback" in line for line in process.lines)
    finally:
        process.kill()


# --- the command line ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--alpha", "2"], "alpha must lie in (0, 1]"),
    (["--port", "70000"], "--port must lie in 0..65535"),
    (["--queue-size", "0"], "--queue-size must be at least 1"),
    (["--min-layers", "many"], "min-layers must be"),
    (["--api-key", " "], "--api-key must not be empty"),
])
def test_command_line_mistakes_are_one_line_and_exit_2(cli, args, words):
    result = cli(["serve", *args])
    assert result.exit_code == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_without_the_serve_extra_it_says_what_to_install(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now fails as if it were not installed
    result = cli(["serve"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "d3: error: d3 serve needs uvicorn: pip install 'd3cli[serve]'"


def test_a_port_in_use_is_one_line(cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli(["serve", "--port", str(taken.getsockname()[1])])
    assert result.exit_code == 2 and "already in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_model_that_cannot_load_stops_the_server_with_one_line(cli, tmp_path):
    result = cli(["serve", "--port", "0", "--model", str(tmp_path / "no-such-model"), "--log-format", "json"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == f"d3: error: no such file or folder: {tmp_path / 'no-such-model'}"


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
