#!/usr/bin/env python3
"""d3 and llama.cpp on GGUF files of real models' shapes, in turns (this VM's speed drifts ±30 % over minutes).

    python docs/measurements/scale/measure.py --llama-bin DIR FILE.gguf [FILE.gguf ...] > results.json
    python docs/measurements/scale/measure.py --d3-only --tokens 48 --repeats 4 FILE.gguf_or_FOLDER
    python docs/measurements/scale/measure.py --llama-bin DIR --context 2000 --tokens 16 FILE.gguf

`--d3-only` runs the two d3 sides alone (a safetensors folder, or D3 against full depth over more rounds).
`--context N` times long contexts instead: d3 on a prompt of about N tokens (its prefill tokens/s, and its decode
tokens/s after it), llama.cpp's prefill of N tokens (llama-bench -p N) and its decode at depth N (-d N).

For each file and each of `--repeats` rounds, one after another:
    d3 full depth        d3 generate -n TOKENS --json --alpha 1 (a new process: its load time, peak memory, prefill
                         and decode tokens/s as the reply's JSON reports them, and the process's wall time)
    d3 at the paper's    the same with --alpha 0.98 --min-layers 0.5 (floor L/2): decode tokens/s, mean layers, and
    regime               the layer limit: what streaming only the kept layers' weights would give
    llama.cpp decode     llama-bench -t 2 -p 0 -n TOKENS (and its peak memory)
    llama.cpp prefill    llama-bench -t 2 -p PROMPT -n 0
    llama.cpp start      llama-simple -n 1: a new process's load and first token, wall time
    d3 start             d3 generate -n 1 --no-chat: the same for d3, the same prompt text (its packed tiles mapped
                         from d3's cache after the first run, core/model/tile_cache.py)

The files are written by write_shaped_gguf.py beside this script (random weights: fine for time and memory, never
for quality). Results are printed as JSON, one object per measurement.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a long story about a dragon who learns to paint."


def timed(command: list[str]) -> tuple[str, float, int]:
    """stdout, wall seconds and peak resident bytes of a command (GNU time)."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed: {done.stderr[-2000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024
    return done.stdout, wall, peak


def long_prompt(tokens: int) -> str:
    """A prompt of about `tokens` tokens (this prose runs about 4.8 characters a token here)."""
    paragraph = ("The river runs past the old mill, where the miller's daughter paints the water each morning "
                 "before the town wakes. ")
    return (paragraph * (tokens * 5 // len(paragraph) + 1))[:tokens * 48 // 10] + "\nSummarize the story."


def d3(file: Path, tokens: int, schedule: list[str], prompt: str = PROMPT) -> dict:
    out, wall, peak = timed([str(Path(sys.executable).parent / "d3"), "generate", "--model", str(file), "-n",
                             str(tokens), "--json", *schedule, prompt])
    record = json.loads(out)
    num_layers, mean = record["num_layers"], record["mean_layers"]
    return {"decode_tokens_per_s": record["decode_tokens_per_s"],
            "prefill_tokens_per_s": record["prefill_tokens_per_s"], "prompt_tokens": record["prompt_tokens"],
            "load_s": record["load_s"], "time_to_first_token_s": record["time_to_first_token_s"],
            "process_wall_s": round(wall, 2), "peak_memory_bytes": peak, "generated_tokens":
            record["generated_tokens"], "mean_layers": mean, "num_layers": num_layers,
            "weights": record["weights_detail"]}


def llama_bench(binaries: Path, file: Path, arguments: list[str]) -> dict:
    out, wall, peak = timed([str(binaries / "llama-bench"), "-m", str(file), "-t", "2", "-r", "1", "-o", "json",
                             *arguments])
    row = json.loads(out)[0]
    return {"tokens_per_s": row["avg_ts"], "peak_memory_bytes": peak, "wall_s": round(wall, 2),
            "n_prompt": row["n_prompt"], "n_gen": row["n_gen"], "n_depth": row.get("n_depth", 0)}


def d3_start(file: Path) -> dict:
    _, wall, peak = timed([str(Path(sys.executable).parent / "d3"), "generate", "--model", str(file), "-n", "1",
                           "--no-chat", PROMPT])  # the prompt as llama-simple takes it: no chat template
    return {"process_wall_s": round(wall, 2), "peak_memory_bytes": peak}


def llama_start(binaries: Path, file: Path) -> dict:
    _, wall, peak = timed([str(binaries / "llama-simple"), "-m", str(file), "-n", "1", PROMPT])
    return {"process_wall_s": round(wall, 2), "peak_memory_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--llama-bin", type=Path, help="folder with llama-bench and llama-simple")
    parser.add_argument("--d3-only", action="store_true", help="time d3's two sides only")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--context", type=int, help="time a prompt of about N tokens and decode after it instead")
    parser.add_argument("--start-only", action="store_true", help="time the two starts only (d3's and llama.cpp's)")
    options = parser.parse_args()
    if not options.d3_only and options.llama_bin is None:
        parser.error("--llama-bin is needed unless --d3-only")
    for file in options.files:
        size = sum(path.stat().st_size for path in file.glob("*.safetensors")) if file.is_dir() else file.stat().st_size
        for round_ in range(options.repeats):
            if options.start_only:
                for name, row in (("llama.cpp start", llama_start(options.llama_bin, file)),
                                  ("d3 start", d3_start(file))):
                    print(json.dumps({"file": file.name, "file_bytes": size, "round": round_, "side": name, **row}),
                          flush=True)
                continue
            if options.context:
                rows = {"d3 long prompt": d3(file, options.tokens, ["--alpha", "1"], long_prompt(options.context))}
                if not options.d3_only:
                    rows.update({
                        "llama.cpp prefill": llama_bench(options.llama_bin, file,
                                                         ["-p", str(options.context), "-n", "0"]),
                        "llama.cpp decode at depth": llama_bench(options.llama_bin, file, [
                            "-p", "0", "-n", str(options.tokens), "-d", str(options.context)]),
                    })
                for name, row in rows.items():
                    print(json.dumps({"file": file.name, "file_bytes": size, "round": round_, "side": name, **row}),
                          flush=True)
                continue
            rows = {
                "d3 full depth": d3(file, options.tokens, ["--alpha", "1"]),
                "d3 alpha 0.98 floor L/2": d3(file, options.tokens, ["--alpha", "0.98", "--min-layers", "0.5"]),
            }
            if not options.d3_only:
                rows.update({
                    "llama.cpp decode": llama_bench(options.llama_bin, file, ["-p", "0", "-n", str(options.tokens)]),
                    "llama.cpp prefill": llama_bench(options.llama_bin, file,
                                                     ["-p", str(options.prompt_tokens), "-n", "0"]),
                    "llama.cpp start": llama_start(options.llama_bin, file),
                    "d3 start": d3_start(file),
                })
            for name, row in rows.items():
                print(json.dumps({"file": file.name, "file_bytes": size, "round": round_, "side": name, **row}),
                      flush=True)


if __name__ == "__main__":
    main()
