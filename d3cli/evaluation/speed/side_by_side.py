"""`d3 bench --task speed`, side by side per weight kind: decode tokens/s at full depth and with D3, the bytes each
step streams, the physical limit those bytes leave on this machine, and llama.cpp on the same GGUF file.

A decode step at batch 1 reads every weight of the layers it runs once, so no implementation decodes faster than
bandwidth ÷ bytes per step; the limit stands beside every figure. The memory bandwidth is measured here (the best of
several sums over a buffer far larger than the caches). The sides (each weight kind at full depth and with the
schedule, llama.cpp) take turns within every round and each step's time is its median over the rounds, so this
VM's drifting speed moves every side alike. llama.cpp is optional (the `llama_cpp` module of the
llama-cpp-python package, else a `llama-bench` binary of a llama.cpp build); d3 never needs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from d3cli.core.decode.schedule import DecaySchedule
from d3cli.core.model.gguf_blocks import read_gguf
from d3cli.core.model.model_facts import num_decoder_layers
from d3cli.evaluation.speed.steps import mean_decode_layers
from d3cli.evaluation.timing import decode_seconds, median_total, prefill_and_decode_seconds

BANDWIDTH_BYTES = 1 << 30  # 1 GiB: far past the last-level cache of any CPU here


def memory_bandwidth(repeats: int = 5, size_bytes: int = BANDWIDTH_BYTES) -> float:
    """Bytes per second this machine reads from memory: the best of `repeats` float32 sums over `size_bytes`."""
    buffer = torch.ones(size_bytes // 4, dtype=torch.float32)
    buffer.sum()  # touched once: the pages exist
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return size_bytes / best


class LlamaCpp:
    """llama.cpp (through llama-cpp-python) decoding a GGUF file greedily, one token per call, like d3's steps."""

    def __init__(self, gguf_path: str, threads: int, context: int):
        import llama_cpp

        self.version = getattr(llama_cpp, "__version__", "?")
        self.model = llama_cpp.Llama(model_path=gguf_path, n_threads=threads, n_threads_batch=threads, n_ctx=context,
                                     verbose=False)

    def decode_seconds(self, prompt_ids: Sequence[int], tokens: int) -> list[float]:
        """Wall seconds of each decode step (steps 1..tokens−1; step 0 is the prefill's), as `decode_seconds`. The
        prompt goes in token by token, which changes nothing in the decode steps that are timed."""
        import numpy as np

        model = self.model
        model.reset()
        for token in prompt_ids:  # one at a time: batched evaluation crashes some builds (0.3.36 built here)
            model.eval([int(token)])
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
        durations = []
        for _ in range(tokens - 1):
            started = time.perf_counter()
            model.eval([token])
            token = int(np.argmax(model.scores[model.n_tokens - 1]))
            durations.append(time.perf_counter() - started)
        return durations


class LlamaBench:
    """llama.cpp's own `llama-bench` binary decoding a GGUF file: where llama-cpp-python is not installed but a
    llama.cpp build is (D3_LLAMA_BENCH names the binary, else `llama-bench` on PATH). It times a whole run of N tokens
    after a context as long as the prompt (`-d`), so each step is its mean: the sum over the steps is llama.cpp's."""

    def __init__(self, binary: str, gguf_path: str, threads: int):
        self.binary, self.gguf_path, self.threads = binary, gguf_path, threads
        self.version = "llama-bench"

    def decode_seconds(self, prompt_ids: Sequence[int], tokens: int) -> list[float]:
        row = self._run(["-p", "0", "-n", str(tokens - 1), "-d", str(len(prompt_ids))])
        return [1.0 / float(row["avg_ts"])] * (tokens - 1)

    def prefill_seconds(self, prompt_tokens: int) -> float:
        """Seconds llama.cpp takes to read a prompt of `prompt_tokens` tokens (llama-bench -p N -n 0)."""
        return prompt_tokens / float(self._run(["-p", str(prompt_tokens), "-n", "0"])["avg_ts"])

    def _run(self, arguments: list[str]) -> dict:
        command = [self.binary, "-m", self.gguf_path, "-t", str(self.threads), *arguments, "-r", "1", "-o", "json"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"llama-bench failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
        row = json.loads(done.stdout)[0]
        self.version = f"llama-bench build {row.get('build_number', '?')} ({row.get('build_commit', '?')})"
        return row


def llama_bench_side(gguf_path: str | None, threads: int) -> tuple[LlamaBench | None, str]:
    """llama.cpp's llama-bench on the model's GGUF file (D3_LLAMA_BENCH, else on PATH), else None and why not: what
    times a long prompt (llama-cpp-python's side feeds prompts a token at a time)."""
    if gguf_path is None:
        return None, "the model is not a GGUF file"
    binary = os.environ.get("D3_LLAMA_BENCH") or shutil.which("llama-bench")
    if binary and Path(binary).is_file():
        return LlamaBench(binary, gguf_path, threads), ""
    return None, "no llama-bench binary (on PATH, or D3_LLAMA_BENCH) is installed"


def long_prompt(loaded, prompt_ids: Sequence[int], tokens: int, repeats: int, gguf_path: str | None) -> dict:
    """Prefill tokens/s of the long prompt `prompt_ids` and decode tokens/s after it at full depth, d3 and llama.cpp
    (its llama-bench: a prompt of the same length, and decode steps after a context of that length) in turns, each
    the median over `repeats` rounds; llama.cpp's over d3's as ratios."""
    full = DecaySchedule.full(num_decoder_layers(loaded.model))
    llama, why = llama_bench_side(gguf_path, torch.get_num_threads())
    d3_rounds: list[tuple[float, list[float]]] = []
    llama_rounds: list[tuple[float, list[float]]] = []
    for round_index in range(repeats):
        sides = ["d3", "llama.cpp"] if llama is not None else ["d3"]
        for side in sides if round_index % 2 == 0 else reversed(sides):
            if side == "d3":
                d3_rounds.append(prefill_and_decode_seconds(loaded.model, prompt_ids, full, tokens))
            else:
                llama_rounds.append((llama.prefill_seconds(len(prompt_ids)),
                                     llama.decode_seconds(prompt_ids, tokens)))

    def rates(rounds):
        prefill = statistics.median(seconds for seconds, _ in rounds)
        decode = median_total([steps for _, steps in rounds])
        return {"prefill_tokens_per_s": len(prompt_ids) / prefill, "decode_tokens_per_s": (tokens - 1) / decode}

    report = {"prompt_tokens": len(prompt_ids), "tokens": tokens, "d3": rates(d3_rounds)}
    if llama is None:
        report["llama_cpp"] = {"skipped": why}
    else:
        theirs = rates(llama_rounds)
        report["llama_cpp"] = {**theirs, "version": llama.version}
        report["vs_llama_cpp"] = {key: report["d3"][key] / theirs[key] for key in theirs}
    return report


def llama_cpp_side(gguf_path: str | None, threads: int, context: int) -> tuple[LlamaCpp | LlamaBench | None, str]:
    """llama.cpp on the model's GGUF file when both exist (llama-cpp-python, else a llama-bench binary), else None
    and why not."""
    if gguf_path is None:
        return None, "the model is not a GGUF file"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        binary = os.environ.get("D3_LLAMA_BENCH") or shutil.which("llama-bench")
        if binary and Path(binary).is_file():
            return LlamaBench(binary, gguf_path, threads), ""
        return None, ("neither llama-cpp-python (pip install llama-cpp-python builds it in ~10 min) nor a llama-bench "
                      "binary (on PATH, or D3_LLAMA_BENCH) is installed")
    return LlamaCpp(gguf_path, threads, context), ""


@dataclasses.dataclass
class Side:
    """One decoder timed in turns with the others: a name, a weight kind, and a function decoding N tokens."""

    name: str
    weights: str
    decode: Callable[[int], list[float]]
    step_bytes: float  # weight bytes one decode step streams (mean over the steps)
    mean_layers: float | None = None  # k̄ of the decode steps, None for llama.cpp (full depth)
    rounds: list[list[float]] = dataclasses.field(default_factory=list)


def compare(sides: Sequence[Side], tokens: int, repeats: int, bandwidth: float) -> list[dict]:
    """The sides decode `tokens` tokens in turns `repeats` times (the order rotating by round), each timed decode
    right after an untimed one of a few tokens: the side before may have pushed this one's weights out of the CPU's
    caches (a float32 model streams 538 MB a step), and each side is timed as it runs on its own. Tokens/s from the
    sum of each step's median; the limit bandwidth ÷ bytes per step beside it."""
    warm_up = min(tokens, 8)
    for round_index in range(repeats):
        shift = round_index % len(sides)
        for side in [*sides[shift:], *sides[:shift]]:
            side.decode(warm_up)
            side.rounds.append(side.decode(tokens))
    rows = []
    for side in sides:
        seconds = median_total(side.rounds)
        rate = len(side.rounds[0]) / seconds if seconds > 0 else float("nan")
        limit = bandwidth / side.step_bytes if side.step_bytes else None
        rows.append({"name": side.name, "weights": side.weights, "tokens_per_s": rate,
                     "step_ms": 1e3 / rate if rate else None, "mean_layers": side.mean_layers,
                     "step_bytes": side.step_bytes, "limit_tokens_per_s": limit,
                     "of_limit": rate / limit if limit else None})
    return rows


def d3_sides(loaded, schedules: dict, prompt_ids: Sequence[int], tokens: int, name: str | None = None) -> list[Side]:
    """Full depth and each named schedule of one loaded model as timed sides (named "d3 NAME LABEL", NAME the
    weights' kind unless given)."""
    report = loaded.weights
    sides = []
    for label, schedule in schedules.items():
        k_bar = mean_decode_layers(schedule, tokens)
        sides.append(Side(f"d3 {name or report.kind} {label}", report.kind,
                          lambda count, schedule=schedule: decode_seconds(loaded.model, prompt_ids, schedule, count),
                          report.step_bytes_at(k_bar), k_bar))
    return sides


def with_llama_ratios(rows: list[dict]) -> list[dict]:
    """Each row's tokens/s over llama.cpp's, when llama.cpp ran."""
    anchor = next((row for row in rows if row["weights"] == "llama.cpp"), None)
    for row in rows:
        row["vs_llama_cpp"] = row["tokens_per_s"] / anchor["tokens_per_s"] if anchor else None
    return rows


def gguf_step_bytes(gguf_path: str) -> float:
    """The bytes a llama.cpp decode step reads from its file: every tensor but the token embedding's rows (read
    one row a step), counting the embedding once more when it is also the output layer (tied)."""
    tensors = read_gguf(Path(gguf_path)).tensors
    names = {tensor.name for tensor in tensors}
    total = 0
    for tensor in tensors:
        size = tensor.nbytes
        if tensor.name == "token_embd.weight":
            total += size if "output.weight" not in names else 0
        else:
            total += size
    return float(total)


def median_step_ms(rounds: Sequence[Sequence[float]]) -> float:
    return statistics.median(value for round_ in rounds for value in round_) * 1e3
