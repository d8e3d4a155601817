"""server/client.py: `d3 generate --server` and `d3 chat --server` against a real `d3 serve` of the tiny model give
what a local run gives (the same tokens, layer counts and JSON keys); every mistake is one line and exit 2; a server
that stops mid-reply leaves what arrived in the --jsonl output, marked unfinished."""

from __future__ import annotations

import http.server
import json
import socket
import threading

import pytest

from d3cli.core.session.settings import DecodeSettings
from d3cli.server.client import UNFINISHED, server_address, server_sent_events, settings_fields

SCHEDULE = ["--alpha", "0.8", "--min-layers", "3", "--head", "1", "--tail", "1"]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("options", [["-n", "12"], ["-n", "12", *SCHEDULE], ["-n", "10", "--no-chat", *SCHEDULE],
                                     ["-n", "10", "--temperature", "0.8", "--seed", "5"]])
def test_a_served_reply_is_the_local_reply_with_the_same_keys(cli, server, tiny_model_dir, options):
    local = cli(["generate", "--model", str(tiny_model_dir), "--json", *options, "Tell me about the sea"])
    served = cli(["generate", "--model", str(tiny_model_dir), "--server", server.url, "--json", *options,
                  "Tell me about the sea"])
    assert local.exit_code == served.exit_code == 0, served.stderr
    mine, theirs = json.loads(local.stdout), json.loads(served.stdout)
    assert set(theirs) == set(mine) | {"server"} and theirs["server"] == server.url
    for key in ("text", "token_ids", "layers_per_token", "alpha", "min_layers", "head", "tail", "skip_order",
                "schedule_source", "num_layers", "prompt_tokens", "generated_tokens", "finish_reason", "mean_layers"):
        assert theirs[key] == mine[key], key
    assert theirs["load_s"] is None  # nothing loaded in this process


def test_piped_text_and_jsonl_lines_through_the_server(cli, server, tiny_model_dir):
    local = cli(["generate", "--model", str(tiny_model_dir), "-n", "8", *SCHEDULE], stdin=b"Say hi\n")
    served = cli(["generate", "--server", server.url, "-n", "8", *SCHEDULE], stdin=b"Say hi\n")
    assert served.exit_code == 0 and served.stdout == local.stdout and served.stdout.strip()
    lines = b'Say hi\n{"prompt": "Count to three", "alpha": 0.9, "id": "b"}\n\nWhat is the sea?\n'
    local = json_lines(cli(["generate", "--model", str(tiny_model_dir), "--jsonl", "-n", "8"], stdin=lines).stdout)
    served = cli(["generate", "--server", server.url, "--jsonl", "-n", "8", "--batch-size", "2"], stdin=lines)
    assert served.exit_code == 0, served.stderr
    records = json_lines(served.stdout)
    assert [(record["line"], record.get("id")) for record in records] == [(1, None), (2, "b"), (4, None)]
    assert [record["token_ids"] for record in records] == [record["token_ids"] for record in local]
    assert [record["layers_per_token"] for record in records] == [record["layers_per_token"] for record in local]


def test_a_served_chat_is_the_local_chat(cli, server, tiny_model_dir):
    turns = b"Hello there\nWhat did I just say?\n"
    local = json_lines(cli(["chat", "--model", str(tiny_model_dir), "--jsonl", "-n", "10", *SCHEDULE],
                           stdin=turns).stdout)
    served = cli(["chat", "--server", server.url, "--jsonl", "-n", "10", *SCHEDULE], stdin=turns)
    assert served.exit_code == 0, served.stderr
    records = json_lines(served.stdout)
    assert [record["turn"] for record in records] == [1, 2]
    assert [record["token_ids"] for record in records] == [record["token_ids"] for record in local]
    assert [record["layers_per_token"] for record in records] == [record["layers_per_token"] for record in local]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_mistakes_are_one_line_and_exit_2(cli, server, guarded_server, tiny_model_dir):
    cases = [
        (["--server", f"127.0.0.1:{free_port()}"], "no d3 server answers at"),
        (["--server", server.url, "--model", "someone/another-model"], "serves"),
        (["--server", server.url, "--weights", "int8"], "--weights: the server runs its model"),
        (["--server", "ftp://example"], "--server takes a d3 server's address"),
        (["--server", server.url, "--compare"], "--compare decodes twice in this process"),
        (["--server", server.url, "--calibration", "mine.safetensors"], "--profile and --calibration name files"),
        (["--server", guarded_server.url], "refused the API key"),
    ]
    too_long = cli(["generate", "--server", server.url, "-n", "2", "sea " * 600])
    too_long.assert_user_error("answered 400")
    assert "context" in too_long.stderr
    for args, fragment in cases:
        result = cli(["generate", *args, "-n", "2", "hi"])
        result.assert_user_error(fragment)


def test_the_key_comes_from_d3_api_key(cli, guarded_server, monkeypatch):
    monkeypatch.setenv("D3_API_KEY", "sesame")
    result = cli(["generate", "--server", guarded_server.url, "-n", "3", "--json", "hi"])
    assert result.exit_code == 0 and json.loads(result.stdout)["generated_tokens"] == 3


def test_d3_server_in_the_environment_is_the_option(cli, server, monkeypatch):
    monkeypatch.setenv("D3_SERVER", server.url)
    result = cli(["generate", "-n", "3", "--json", "hi"])
    assert result.exit_code == 0 and json.loads(result.stdout)["server"] == server.url


class DroppingServer(http.server.BaseHTTPRequestHandler):
    """A d3 server that sends two tokens of a streamed reply and then closes the connection."""

    def log_message(self, *args) -> None:
        pass

    def reply_json(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self.reply_json({"status": "ok", "model": "fake", "num_layers": 4, "chat_template": True})
        else:
            self.reply_json({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for index, text in enumerate(["Hel", "lo"]):
            chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
                     "d3": {"token_id": 10 + index, "layers": 4 - index, "elapsed_s": 0.1 * (index + 1)}}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def dropping_server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DroppingServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_a_server_that_stops_mid_reply_leaves_what_arrived_marked_unfinished(cli, dropping_server):
    result = cli(["generate", "--server", dropping_server, "--jsonl", "-n", "8"], stdin=b"Say hi\n")
    result.assert_user_error()
    assert "line 1: the server at" in result.stderr and "stopped sending after 2 tokens" in result.stderr
    (record,) = json_lines(result.stdout)
    assert (record["text"], record["token_ids"], record["layers_per_token"]) == ("Hello", [10, 11], [4, 3])
    assert record["finish_reason"] == UNFINISHED and record["line"] == 1
    single = cli(["generate", "--server", dropping_server, "-n", "8", "Say hi"])
    assert single.exit_code == 2 and single.stdout == "Hello\n" and "unfinished" in single.stderr


def test_addresses_and_request_fields():
    assert server_address("8000") == ("127.0.0.1", 8000, "http://127.0.0.1:8000")
    assert server_address("localhost:9") == ("localhost", 9, "http://localhost:9")
    assert server_address("http://10.0.0.2:80/") == ("10.0.0.2", 80, "http://10.0.0.2:80")
    assert settings_fields(DecodeSettings()) == {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": 0}
    changed = settings_fields(DecodeSettings(alpha=0.9, head=1, stop=("\n",), max_new_tokens=5))
    assert changed == {"max_tokens": 5, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "stop": ["\n"], "alpha": 0.9,
                       "head": 1}


class Lines:
    def __init__(self, data: bytes):
        self.lines = data.splitlines(keepends=True)

    def readline(self) -> bytes:
        return self.lines.pop(0) if self.lines else b""


def test_server_sent_events_are_read_one_payload_each():
    assert list(server_sent_events(Lines(b'data: {"a": 1}\n\n: comment\n\ndata: [DONE]\n\n'))) == ['{"a": 1}',
                                                                                                   "[DONE]"]


def test_the_lines_before_a_bad_one_are_still_answered(cli, server):
    result = cli(["generate", "--server", server.url, "--jsonl", "-n", "3", "--batch-size", "4"],
                 stdin=b'Say hi\n{"prompt": \n')
    result.assert_user_error("line 2")
    assert [record["line"] for record in json_lines(result.stdout)] == [1]
