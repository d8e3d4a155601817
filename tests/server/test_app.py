"""The app of `d3 serve` (app.py): the gate's API key, serving while the model loads, Ctrl-C, binding the port, and
a model that cannot load, through a real server process or the command line."""

from __future__ import annotations

import signal
import socket
import sys

import openai
import pytest

from server.conftest import START_TIMEOUT_S, ServeProcess, chat_reply, open_stream, read_data_lines, request

# --- API key, Ctrl-C ----------------------------------------------------------------------------------------------


def test_an_api_key_is_required_when_set(guarded_server):
    with pytest.raises(openai.AuthenticationError) as caught:
        guarded_server.client("wrong").models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    assert request(guarded_server, "POST", "/v1/completions", {"prompt": "hi"})[0] == 401
    assert request(guarded_server, "GET", "/health")[0] == 200  # for load balancers and scripts: no key
    reply = chat_reply(guarded_server.client("sesame"), max_tokens=3)
    assert reply.usage.completion_tokens == 3


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


# --- the command line (its mistakes: tests/cli/commands/test_serve.py) ---------------------------------------------


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
