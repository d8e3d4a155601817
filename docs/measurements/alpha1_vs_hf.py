"""Tokens/s of d3's engine at alpha = 1 against the model's own `generate`, same prompt, same tokens.

Greedy, EOS ignored on both sides so both produce exactly --tokens tokens; one untimed warm-up each; then the two
alternate --repeats times and the medians are compared.

Run: python docs/measurements/alpha1_vs_hf.py [--tokens 128] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from d3cli.loader import load
from d3cli.prompts import encode_chat
from d3cli.schedule import DecaySchedule

PROMPT = "Explain in a few paragraphs why the sky is blue and why sunsets are red."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--alpha", type=float, default=1.0)
    args = parser.parse_args()
    loaded = load(None, device="cpu", dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = encode_chat(tokenizer, [{"role": "user", "content": PROMPT}])
    input_ids = torch.tensor([prompt])
    schedule = DecaySchedule.build(model.config.num_hidden_layers, alpha=args.alpha)
    no_eos = frozenset({-1})

    def run_hf() -> tuple[float, list[int]]:
        started = time.perf_counter()
        output = model.generate(input_ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        return time.perf_counter() - started, output[0, len(prompt):].tolist()

    def run_d3() -> tuple[float, list[int]]:
        from d3cli import engine

        started = time.perf_counter()
        events = list(engine.stream_generate(model, tokenizer, [prompt], schedule, max_new_tokens=args.tokens,
                                             eos_ids=no_eos))
        return time.perf_counter() - started, [event.token_id for event in events]

    run_hf(), run_d3()
    hf_times, d3_times = [], []
    for _ in range(args.repeats):
        hf_s, hf_tokens = run_hf()
        d3_s, d3_tokens = run_d3()
        hf_times.append(hf_s)
        d3_times.append(d3_s)
    hf_rate, d3_rate = args.tokens / statistics.median(hf_times), args.tokens / statistics.median(d3_times)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.tokens} tokens, "
          f"median of {args.repeats}")
    print(f"model.generate: {hf_rate:.2f} tokens/s")
    print(f"d3 alpha={args.alpha}: {d3_rate:.2f} tokens/s  ratio {d3_rate / hf_rate:.3f}")
    if args.alpha == 1.0:
        print(f"same tokens: {hf_tokens == d3_tokens}")


if __name__ == "__main__":
    main()
