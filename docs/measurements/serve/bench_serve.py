"""What `d3 serve` costs and gives, measured in one run (this VM's speed drifts, so nothing is compared across runs).

    python docs/measurements/serve/bench_serve.py [--model M] [--tokens 64] [--rounds 5] > serve-cpu.json

1. overhead: the same prompt and settings decoded in this process with the engine (what `d3 generate` runs) and
   through a `d3 serve` child process by an HTTP client (streamed and not), the sides taking turns, one at a time;
   tokens/s as each side's caller sees it (the client: from sending the request to the last byte), medians over
   rounds; the overhead per token is the difference of the medians' seconds per token.
2. time to first token: a short prompt, streamed, on the warm server: from sending the request to the first
   content chunk (median of 10); beside it the engine's own time to first token in this process.
3. throughput: 1, 4 and 8 clients at once sharing `--throughput-requests` (16) streamed requests of
   `--throughput-tokens` (32) tokens, each with its own prompt; total generated tokens over wall time, mean request
   latency, median time to first token; against the default server (one decode at a time) and a second server
   started with `--batch-size 8` (only one of them busy at a time). Client counts and servers take turns,
   `--throughput-rounds` (2) times; medians per count and server.

Prints one JSON object on stdout and a short table on stderr.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
TOPICS = ["the sea", "mountains", "a city at night", "bees", "an old clock", "rain", "a library", "trains"]


def start_server(model: str | None, batch_size: int) -> tuple[subprocess.Popen, int]:
    d3 = Path(sys.executable).with_name("d3")
    args = [str(d3), "serve", "--port", "0", "--log-format", "json", "--queue-size", "64",
            "--batch-size", str(batch_size)]
    if model:
        args += ["--model", model]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port = None
    for line in process.stderr:
        record = json.loads(line)
        if record.get("event") == "listening":
            port = record["port"]
        if record.get("event") == "ready":
            break
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # keep the pipe drained
    return process, port


def post(port: int, body: dict, stream: bool) -> dict:
    """One chat completion; seconds to the first content chunk and to the end, tokens, token ids."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": stream}).encode(),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first = None
    if not stream:
        answer = json.loads(response.read())
        done = time.perf_counter()
        connection.close()
        return {"first_s": None, "total_s": done - started, "tokens": answer["usage"]["completion_tokens"],
                "token_ids": answer["d3"]["token_ids"]}
    last = None
    while True:
        line = response.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content") is not None:
            first = time.perf_counter() - started
        if "d3" in chunk:
            last = chunk
    done = time.perf_counter()
    connection.close()
    return {"first_s": first, "total_s": done - started, "tokens": len(last["d3"]["token_ids"]),
            "token_ids": last["d3"]["token_ids"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="the second server's --batch-size")
    parser.add_argument("--throughput-requests", type=int, default=16)
    parser.add_argument("--throughput-rounds", type=int, default=2)
    parser.add_argument("--throughput-tokens", type=int, default=32)
    options = parser.parse_args()

    from d3cli.core.decode import engine
    from d3cli.core.model.loader import load
    from d3cli.core.model.model_facts import num_decoder_layers
    from d3cli.core.session.front_door import attach_calibration
    from d3cli.core.session.settings import DecodeSettings
    from d3cli.core.text.prompts import encode_chat

    settings = DecodeSettings(max_new_tokens=options.tokens)
    loaded = attach_calibration(load(options.model), settings)
    schedule = settings.schedule_for(num_decoder_layers(loaded.model), loaded.calibration)
    prompt_ids = encode_chat(loaded.tokenizer, [{"role": "user", "content": PROMPT}])
    process, port = start_server(options.model, 1)
    batched_process, batched_port = start_server(options.model, options.batch_size)
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": options.tokens}
    report: dict = {"model": loaded.name, "tokens": options.tokens, "rounds": options.rounds,
                    "second_server_batch_size": options.batch_size,
                    "settings": "defaults (alpha 0.98, min_layers 0.84, the model's calibration)"}
    try:
        def in_process() -> dict:
            started = time.perf_counter()
            (reply,) = engine.decode(loaded, [prompt_ids], schedule, settings)
            return {"total_s": time.perf_counter() - started, "tokens": reply.generated_tokens,
                    "first_s": reply.first_token_s, "token_ids": reply.token_ids}

        in_process(), post(port, body, True)  # warm-up, untimed
        sides = {"in_process": [], "server_streamed": [], "server_whole": []}
        for _ in range(options.rounds):
            sides["in_process"].append(in_process())
            sides["server_streamed"].append(post(port, body, True))
            sides["server_whole"].append(post(port, body, False))
        reference = sides["in_process"][0]["token_ids"]
        same = all(run["token_ids"] == reference for runs in sides.values() for run in runs)
        overhead = {"same_tokens": same, "generated_tokens": len(reference)}
        for name, runs in sides.items():
            per_token = statistics.median(run["total_s"] / run["tokens"] for run in runs)
            overhead[name] = {"tokens_per_s": round(1 / per_token, 2), "s_per_token": round(per_token, 5),
                              "runs_s": [round(run["total_s"], 3) for run in runs]}
        base = overhead["in_process"]["s_per_token"]
        for name in ("server_streamed", "server_whole"):
            extra = overhead[name]["s_per_token"] - base
            overhead[name]["overhead_ms_per_token"] = round(1000 * extra, 3)
            overhead[name]["overhead_percent"] = round(100 * extra / base, 2)
        report["overhead"] = overhead

        short = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        firsts = [post(port, short, True)["first_s"] for _ in range(10)]
        engine_first = []
        short_ids = encode_chat(loaded.tokenizer, short["messages"])
        for _ in range(10):
            (reply,) = engine.decode(loaded, [short_ids], schedule, DecodeSettings(max_new_tokens=1))
            engine_first.append(reply.first_token_s)
        report["time_to_first_token"] = {
            "prompt": "Hi (chat template)", "prompt_tokens": len(short_ids),
            "server_median_s": round(statistics.median(firsts), 4), "server_runs_s": [round(x, 4) for x in firsts],
            "in_process_median_s": round(statistics.median(engine_first), 4)}

        def load_test(port: int, clients: int) -> dict:
            results: list[dict] = []
            lock = threading.Lock()
            numbers = iter(range(options.throughput_requests))

            def client() -> None:
                while True:
                    with lock:
                        number = next(numbers, None)
                    if number is None:
                        return
                    topic = TOPICS[number % len(TOPICS)]
                    answer = post(port, {"messages": [{"role": "user", "content": f"Tell me about {topic}."}],
                                         "max_tokens": options.throughput_tokens}, True)
                    with lock:
                        results.append(answer)

            threads = [threading.Thread(target=client) for _ in range(clients)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - started
            tokens = sum(result["tokens"] for result in results)
            return {"requests": len(results), "tokens": tokens, "wall_s": round(wall, 3),
                    "tokens_per_s": round(tokens / wall, 2),
                    "mean_latency_s": round(statistics.mean(r["total_s"] for r in results), 3),
                    "median_first_token_s": round(statistics.median(r["first_s"] for r in results), 3)}

        servers = {1: port, options.batch_size: batched_port}
        runs: dict[tuple[int, int], list[dict]] = {(batch, clients): [] for clients in (1, 4, 8) for batch in servers}
        for _ in range(options.throughput_rounds):
            for batch, clients in runs:
                runs[batch, clients].append(load_test(servers[batch], clients))
        throughput = [{"server_batch_size": batch, "clients": clients,
                       "tokens_per_s": statistics.median(run["tokens_per_s"] for run in got),
                       "mean_latency_s": statistics.median(run["mean_latency_s"] for run in got),
                       "median_first_token_s": statistics.median(run["median_first_token_s"] for run in got),
                       "runs": got} for (batch, clients), got in runs.items()]
        report["throughput"] = throughput
    finally:
        for child in (process, batched_process):
            child.terminate()
            child.wait(timeout=60)
    print(json.dumps(report, indent=2))
    o = report["overhead"]
    sys.stderr.write(
        f"in process {o['in_process']['tokens_per_s']} tok/s; server streamed {o['server_streamed']['tokens_per_s']} "
        f"({o['server_streamed']['overhead_percent']:+.2f} %), whole {o['server_whole']['tokens_per_s']} "
        f"({o['server_whole']['overhead_percent']:+.2f} %); same tokens: {o['same_tokens']}\n"
        f"time to first token: server {report['time_to_first_token']['server_median_s']} s, in process "
        f"{report['time_to_first_token']['in_process_median_s']} s\n"
        + "".join(f"--batch-size {t['server_batch_size']}, {t['clients']} clients: {t['tokens_per_s']} tok/s, "
                  f"mean latency {t['mean_latency_s']} s\n" for t in report["throughput"]))


if __name__ == "__main__":
    main()
