"""render/speed.py: `d3 bench --task speed`'s report, from the quick report's four sections to the full one."""

from __future__ import annotations

import io

from rich.console import Console

from d3cli.cli import render

QUICK = {
    "model": "tiny", "quick": True, "machine": {"device": "cpu", "dtype": "float32", "torch": "2.13.0", "threads": 2},
    "weights": None, "tokens": 32, "repeats": 3, "hf_tokens_per_s": 40.123, "d3_alpha1_tokens_per_s": 44.5,
    "alpha1_ratio": 1.1091, "same_tokens": True, "t_fixed_ms": 2.345, "t_layer_ms": 0.6789, "r2": 0.99876,
    "step_ms": [{"layers": 2, "ms": 3.71}, {"layers": 8, "ms": 7.77}],
    "alphas": [{"alpha": 0.9, "bridges": False, "mean_layers": 5.25, "ideal_speedup": 1.4, "measured_speedup": 1.3,
                "efficiency": 0.9286}],
}
LONG_PROMPT = {"prompt_tokens": 1024, "d3": {"prefill_tokens_per_s": 500.0, "decode_tokens_per_s": 30.0},
               "llama_cpp": {"prefill_tokens_per_s": 800.0, "decode_tokens_per_s": 35.0},
               "vs_llama_cpp": {"prefill_tokens_per_s": 0.625, "decode_tokens_per_s": 0.857}}
WEIGHT_KINDS = {
    "bandwidth_gb_s": 20.0,
    "weight_kinds": [
        {"name": "float32", "mean_layers": None, "step_bytes": 540e6, "tokens_per_s": 30.0,
         "limit_tokens_per_s": 37.04, "of_limit": 0.81, "vs_llama_cpp": None},
        {"name": "int8 with D3", "mean_layers": 5.25, "step_bytes": 135e6, "tokens_per_s": 90.0,
         "limit_tokens_per_s": 148.1, "of_limit": 0.6077, "vs_llama_cpp": 1.1}],
    "skipped_weight_kinds": {"int4": "no kernels here"}, "llama_cpp": {"skipped": "llama-bench not found"},
}
FULL = {
    **QUICK, **WEIGHT_KINDS, "quick": False, "weights": {"label": "int8"}, "same_tokens": False, "load_s": 1.23,
    "peak_memory_bytes": 1.5e9, "long_prompt": LONG_PROMPT,
    "transformers_layers": {"t_fixed_ms": 3.0, "t_layer_ms": 1.0, "r2": 0.95},
    "calibration": "c.safetensors", "t_bridge_ms": 0.123, "bridged_step_ms": [{"layers": 4, "ms": 5.55,
                                                                            "bridged_runs": 1}],
    "batches": [{"batch_size": 4, "full_tokens_per_s": 100.0, "d3_tokens_per_s": 130.0, "speedup": 1.3}],
    "kv_cache": {"tokens": 256, "full_bytes": 8 * 2**20, "d3_bytes": 5 * 2**20, "ratio": 0.625,
                 "full_allocated_bytes": 10 * 2**20, "d3_allocated_bytes": 6 * 2**20},
    "first_token": {"cold_s": 12.3, "warm_s": 2.1, "warm_exit_s": 2.4},
}


def shown(draw, *args) -> str:
    console = Console(file=io.StringIO(), width=100, force_terminal=False)
    draw(console, *args)
    return console.file.getvalue()


def test_the_quick_report():
    text = shown(render.print_speed_report, QUICK)
    lines = text.splitlines()
    assert " ".join(" ".join(lines[0:2]).split()) == (
        "d3 bench · speed (quick) · tiny · cpu, weights float32, torch 2.13.0, 2 threads · 32-token replies, "
        "medians of 3")
    assert lines[2] == "model.generate 40.12 tok/s · d3 α=1 44.50 tok/s · ratio 1.109 · same tokens: yes"
    assert lines[3] == "step time T(k) ≈ 2.35 ms + k × 0.679 ms (R² 0.9988); measured: 2→3.7, 8→7.8 ms"
    assert lines[4].split() == ["α", "bridges", "k̄", "r̄", "ideal", "measured", "efficiency"]
    assert lines[5].split() == ["0.9", "no", "5.25", "0.00", "1.40×", "1.30×", "0.929"]
    assert "efficiency = measured / ideal" in lines[-1]
    for section in ("decode tokens/s", "KV cache", "first token", "batch", "llama.cpp"):
        assert section not in text


def test_the_full_report_has_every_section():
    text = shown(render.print_speed_report, FULL)
    lines = text.splitlines()
    assert lines[0].startswith("d3 bench · speed · tiny · cpu, weights int8,")
    for line in (
        "load 1.2 s · peak memory 1.50 GB (before any other weight kind loaded)",
        "model.generate 40.12 tok/s · d3 α=1 44.50 tok/s · ratio 1.109 · same tokens: NO",
        "with transformers' own decoder layers: T(k) ≈ 3.00 ms + k × 1.000 ms (R² 0.9500)",
        "bridges (c.safetensors): 0.123 ms per bridged run and step; with bridges: 4→5.5 (1 runs) ms",
    ):
        assert line in lines
    joined = " ".join(text.split())
    assert ("a 1024-token prompt, full depth: prefill d3 500.0 tok/s · llama.cpp 800.0 (0.62×); decode after it d3 "
            "30.0 tok/s · llama.cpp 35.0 (0.86×)") in joined
    assert "batch full tok/s d3 tok/s speedup 4 100.0 130.0 1.30×" in joined
    assert ("KV cache after 256 tokens: 8.0 MiB at full depth, 5.0 MiB with D3 (62.5 %); allocated with spare room "
            "10.0 and 6.0 MiB") in joined
    assert ("first token from a new process: cold 12.3 s (empty d3 cache), warm 2.1 s (exit 2.4 s); d3 bench --task "
            "startup says where it goes") in joined


def test_weight_kinds_beside_the_bandwidth_limit_and_what_was_not_timed():
    lines = shown(render.print_weight_kinds, WEIGHT_KINDS).splitlines()
    assert lines[0].strip() == "decode tokens/s · memory bandwidth 20.0 GB/s"
    assert lines[1].split() == ["k̄", "MB/step", "tok/s", "limit", "of", "limit", "×", "llama.cpp"]
    assert lines[2].split() == ["float32", "540.0", "30.0", "37.0", "81", "%"]
    assert lines[3].split() == ["int8", "with", "D3", "5.25", "135.0", "90.0", "148.1", "61", "%", "1.10"]
    assert lines[4:] == ["int4: not timed (no kernels here)", "llama.cpp: not timed (llama-bench not found)"]
    assert shown(render.print_weight_kinds, {**WEIGHT_KINDS, "weight_kinds": []}) == ""


def test_a_long_prompt_without_llama_cpp_says_why():
    report = {"load_s": None, "long_prompt": {**LONG_PROMPT, "llama_cpp": {"skipped": "no llama.cpp binary"}}}
    assert shown(render.print_long_prompt, report).splitlines() == [
        "a 1024-token prompt, full depth: prefill d3 500.0 tok/s; decode after it d3 30.0 tok/s",
        "llama.cpp at a long prompt: not timed (no llama.cpp binary)",
    ]
    assert shown(render.print_long_prompt, {"load_s": None}) == ""


def test_the_startup_report_in_four_lines_and_a_title():
    from d3cli.cli.render.speed import print_startup_report

    report = {"model_args": [], "rounds": 3,
              "first_token": {"cold_s": 20.5, "warm_s": 1.75, "warm_exit_s": 1.9, "runs": 3},
              "stages": {"python_s": 0.02, "torch_import_s": 0.99, "cli_import_s": 0.21, "kernels_s": 0.01,
                         "header_s": 0.004, "config_s": 0.0, "tokenizer_s": 0.09, "weights_s": 0.11,
                         "open_model_s": 0.3, "first_token_s": 0.14, "total_s": 1.63, "transformers_imported": False},
              "server": {"first_token_s": 0.21, "first_token_no_prompt_cache_s": 0.26, "server_first_token_s": 0.015,
                         "server_first_token_no_prompt_cache_s": 0.07, "cached_prompt_tokens": 24, "prompt_tokens": 33,
                         "calls": 20, "local_calls_s": 36.2, "server_calls_s": 6.9, "calls_speedup": 5.25}}
    console = Console(file=io.StringIO(), width=240, force_terminal=False)
    print_startup_report(console, report)
    assert console.file.getvalue().splitlines() == [
        "d3 startup · the embedded model · medians of 3",
        "first token from a new process: cold 20.50 s (empty d3 cache), warm 1.75 s (exit 1.90 s)",
        "through a running d3 serve: first token 0.21 s (24 of 33 prompt tokens from its prompt cache), 0.26 s without "
        "it; the server's own first token 15 ms, 70 ms without",
        "20 one-prompt calls 6.9 s through the server against 36.2 s locally (5.2× faster)",
        "warm start, 1.63 s in one process: python 0.02 · import torch 0.99 · import d3 0.21 · kernels 0.01 · header "
        "0.00 · config 0.00 · tokenizer 0.09 · weights 0.11 · first token 0.14 · rest of the load 0.10 s",
    ]
