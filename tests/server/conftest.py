"""The server's end-to-end tests' shared parts: a real `d3 serve` process on a free loopback port, driven by the
official openai client and by raw HTTP. One tiny-model server answers most tests across the files (no restart
between them), a second one has an API key and a queue of one."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
from pathlib import Path

import openai
import pytest
from conftest import d3_executable

START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 120
PROMPT = "Write a short poem about the sea."
TOO_LONG = {"prompt": "sea " * 600}  # longer than the tiny model's context of 512 tokens


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


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    process = ServeProcess(["--model", str(tiny_model_dir), "--queue-size", "8", "--batch-size", "4"],
                           tmp_path_factory.mktemp("serve"))
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="session")
def guarded_server(tiny_model_dir, tmp_path_factory):
    process = ServeProcess(["--model", str(tiny_model_dir), "--queue-size", "1", "--api-key", "sesame"],
                           tmp_path_factory.mktemp("serve-guarded"), log_format="rich")
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="session")
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
