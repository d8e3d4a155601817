"""`d3 bench --task startup`: how long a shell script waits for d3, in new processes, as a user starts them.

    first token      `d3 generate -n 1` in a new process to its first output line: cold (an empty d3 cache, so a
                     GGUF file is read and recorded again) and warm (the cache filled); the warm process's exit
    through a server the same against a running `d3 serve` of the model (`--server`), with its prompt cache and
                     without (`--no-prompt-cache`), and the servers' own time to the first token; a loop of
                     one-prompt calls (`d3 generate -n 4`) made locally and through the server, in turns; each call
                     asks another question, so the prompt cache gives only the start they share (the chat
                     template's system prompt), as it would a script's loop
    where it goes    the warm start's stages in one new process: Python, importing torch, importing the CLI,
                     loading d3's kernels, the GGUF header, the config, the tokenizer, the weights, the first token

Every time is a median over `rounds`; the compared sides run in turns, so a machine whose speed drifts moves both.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

# Run in a new process by `stages`: each stage of a warm lean start timed where it happens (the loader's own
# functions wrapped, so that a start through transformers, which calls none of them, reports them as absent).
STAGES_SCRIPT = r"""
import json, sys, time
started = time.perf_counter()
marks = {}
def mark(name, since):
    marks[name] = time.perf_counter() - since
now = time.perf_counter(); import torch; mark("torch_import_s", now)
now = time.perf_counter(); import d3cli.cli.app; from d3cli.core.session import front_door; mark("cli_import_s", now)
now = time.perf_counter(); from d3cli import kernels; kernels.available(); mark("kernels_s", now)
from d3cli.core.model import gguf_weights, loader
def timed(name, function):
    def wrapper(*args, **kwargs):
        now = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            marks[name] = marks.get(name, 0.0) + time.perf_counter() - now
    return wrapper
gguf_weights.D3Config = timed("config_s", gguf_weights.D3Config)
gguf_weights.D3Tokenizer = timed("tokenizer_s", gguf_weights.D3Tokenizer)
gguf_weights._fill = timed("weights_s", gguf_weights._fill)
loader.read_header = timed("header_s", loader.read_header)
from d3cli.core.model.loader import ModelOptions
from d3cli.core.session.settings import DecodeSettings
options = json.loads(sys.argv[1])
now = time.perf_counter()
session = front_door.open_model(ModelOptions(**options, lean=True), DecodeSettings(max_new_tokens=1))
mark("open_model_s", now)
now = time.perf_counter()
session.decode([session.encode("Hello")])
mark("first_token_s", now)
marks["total_s"] = time.perf_counter() - started
marks["transformers_imported"] = "transformers" in sys.modules
print(json.dumps(marks))
"""


def generate_command(model_args: Sequence[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "d3cli", "generate", *model_args, *extra]


# A script's questions, one a call: each new process asks the next.
QUESTIONS = ("Say hi.", "Name a colour.", "What is 7 times 6?", "Give me a word that rhymes with cat.",
             "What is the capital of Italy?", "Write a haiku about rain.", "Spell 'river' backwards.",
             "Is a tomato a fruit?", "Count from one to five.", "Why is the sea salty?")


def question(call: int) -> str:
    return QUESTIONS[call % len(QUESTIONS)]


def first_line_seconds(command: Sequence[str], stdin: str, environment: dict | None = None
                       ) -> tuple[float, float, str]:
    """(seconds to the first line on stdout, seconds to the exit, that line) of a new process; a RuntimeError if it
    fails."""
    started = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as errors:  # a file, not a pipe: stderr can never stall the child
        process = subprocess.Popen(command, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=errors, text=True)
        process.stdin.write(stdin)
        process.stdin.close()
        first_line = process.stdout.readline()
        first = time.perf_counter() - started
        process.stdout.read()
        process.wait()
        exited = time.perf_counter() - started
        if process.returncode != 0 or not first_line:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(command[2:5])} failed while timed: {errors.read().strip()}")
    return first, exited, first_line


def first_token_seconds(model_args: Sequence[str], rounds: int) -> dict:
    """A new `d3 generate -n 1` process's first token, cold (an empty d3 cache) and warm, and the warm exit."""
    command = generate_command(model_args, "-n", "1", "--jsonl")
    cold, warm, warm_exit = [], [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="d3-startup-") as cache_dir:
            environment = dict(os.environ, D3_CACHE_DIR=cache_dir)
            cold.append(first_line_seconds(command, '{"prompt": "Hello"}\n', environment)[0])
            first, exited, _ = first_line_seconds(command, '{"prompt": "Hello"}\n', environment)
            warm.append(first)
            warm_exit.append(exited)
    return {"cold_s": statistics.median(cold), "warm_s": statistics.median(warm),
            "warm_exit_s": statistics.median(warm_exit), "runs": rounds}


class ServeChild:
    """`d3 serve --port 0` of the model in a child process, until closed."""

    def __init__(self, model_args: Sequence[str], timeout_s: float = 600.0):
        self.process = subprocess.Popen([sys.executable, "-m", "d3cli", "serve", "--port", "0", "--log-format",
                                         "json", *model_args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self.url = None
        deadline = time.monotonic() + timeout_s
        for line in self.process.stderr:
            record = json.loads(line) if line.startswith("{") else {}
            if record.get("event") == "listening":
                self.url = record["url"]
            if record.get("event") == "ready":
                return
            if time.monotonic() > deadline:
                break
        self.close()
        raise RuntimeError("d3 serve did not become ready for the startup timings")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def through_server(model_args: Sequence[str], rounds: int, calls: int, on_status: Callable[[str], None]) -> dict:
    """First token of a new `d3 generate --server` process against a server with its prompt cache and one with
    `--no-prompt-cache` (both running, asked in turns: the model is loaded twice), the servers' own time to the first
    token from the replies' records, and `calls` one-prompt calls locally and through the cached server, in turns."""
    cached_server = ServeChild(model_args)
    try:
        plain_server = ServeChild([*model_args, "--no-prompt-cache"])
    except BaseException:
        cached_server.close()
        raise
    try:
        found: dict[str, list[dict]] = {"cached": [], "plain": []}
        for call in range(rounds):
            for side, server in (("cached", cached_server), ("plain", plain_server)):
                client = generate_command([], "-n", "1", "--jsonl", "--server", server.url)
                seconds, _, line = first_line_seconds(client, json.dumps({"prompt": question(call)}) + "\n")
                found[side].append({**json.loads(line), "client_s": seconds})
        loop = {"local": 0.0, "server": 0.0}
        for call in range(calls):
            on_status(f"one-prompt calls: {call + 1}/{calls}")
            for side, command in (("local", generate_command(model_args, "-n", "4")),
                                  ("server", generate_command([], "-n", "4", "--server", cached_server.url))):
                loop[side] += first_line_seconds(command, question(rounds + call) + "\n")[1]
    finally:
        cached_server.close()
        plain_server.close()

    def median(side: str, key: str) -> float:
        return statistics.median(record.get(key) or 0 for record in found[side])

    return {"first_token_s": median("cached", "client_s"), "first_token_no_prompt_cache_s": median("plain", "client_s"),
            "server_first_token_s": median("cached", "time_to_first_token_s"),
            "server_first_token_no_prompt_cache_s": median("plain", "time_to_first_token_s"),
            "cached_prompt_tokens": median("cached", "cached_prompt_tokens"),
            "prompt_tokens": median("cached", "prompt_tokens"), "calls": calls, "local_calls_s": loop["local"],
            "server_calls_s": loop["server"], "calls_speedup": loop["local"] / loop["server"]}


def stages(model_options: dict, rounds: int) -> dict:
    """The warm start's stages (medians), and Python's own start for the floor."""
    found = []
    python = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        python.append(time.perf_counter() - started)
        done = subprocess.run([sys.executable, "-c", STAGES_SCRIPT, json.dumps(model_options)], check=True,
                              capture_output=True, text=True)
        found.append(json.loads(done.stdout.strip().splitlines()[-1]))
    keys = [key for key in found[0] if key != "transformers_imported"]
    medians = {key: statistics.median(run.get(key, 0.0) for run in found) for key in keys}
    return {"python_s": statistics.median(python), **medians,
            "transformers_imported": any(run["transformers_imported"] for run in found)}


def measure(model_args: Sequence[str], model_options: dict, rounds: int, calls: int,
            on_status: Callable[[str], None] = lambda message: None) -> dict:
    """The whole startup report of the model that `model_args` (a new process's options) load."""
    on_status("first token in new processes (cold and warm)")
    report = {"model_args": list(model_args), "rounds": rounds, "first_token": first_token_seconds(model_args, rounds)}
    on_status("where the warm start goes")
    report["stages"] = stages(model_options, rounds)
    on_status("through a running d3 serve")
    report["server"] = through_server(model_args, rounds, calls, on_status)
    return report
