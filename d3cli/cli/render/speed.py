"""`d3 bench --task speed`'s report."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from d3cli.cli.render.common import (
    _times,
)


def print_speed_report(console: Console, report: dict) -> None:
    """`d3 bench --task speed`: each weight kind beside the bandwidth limit and llama.cpp, α = 1 against the model's
    own generate, the step-cost fit, D3 against its ideal, batches, the KV cache and the first token (every number
    is also in --json; --quick reports the first four)."""
    machine = report["machine"]
    weights = (report.get("weights") or {}).get("label", machine["dtype"])
    console.print(Text(f"d3 bench · speed{' (quick)' if report.get('quick') else ''} · {report['model']} · "
                       f"{machine['device']}, weights {weights}, torch {machine['torch']}, {machine['threads']} "
                       f"threads · {report['tokens']}-token replies, medians of {report['repeats']}", style="bold"))
    print_weight_kinds(console, report)
    print_long_prompt(console, report)
    console.print(Text(f"model.generate {report['hf_tokens_per_s']:.2f} tok/s · d3 α=1 "
                       f"{report['d3_alpha1_tokens_per_s']:.2f} tok/s · ratio {report['alpha1_ratio']:.3f} · "
                       f"same tokens: {'yes' if report['same_tokens'] else 'NO'}"))
    console.print(Text(f"step time T(k) ≈ {report['t_fixed_ms']:.2f} ms + k × {report['t_layer_ms']:.3f} ms "
                       f"(R² {report['r2']:.4f}); measured: " + ", ".join(
                           f"{row['layers']}→{row['ms']:.1f}" for row in report["step_ms"]) + " ms"))
    if "transformers_layers" in report:
        before = report["transformers_layers"]
        console.print(Text(f"with transformers' own decoder layers: T(k) ≈ {before['t_fixed_ms']:.2f} ms + k × "
                           f"{before['t_layer_ms']:.3f} ms (R² {before['r2']:.4f})"))
    if "t_bridge_ms" in report:
        console.print(Text(f"bridges ({report['calibration']}): {report['t_bridge_ms']:.3f} ms per bridged run and "
                           "step; with bridges: " + ", ".join(
                               f"{row['layers']}→{row['ms']:.1f} ({row['bridged_runs']} runs)"
                               for row in report["bridged_step_ms"]) + " ms"))
    table = Table(header_style="bold", box=None, padding=(0, 1))
    for heading in ("α", "bridges", "k̄", "r̄", "ideal", "measured", "efficiency"):
        table.add_column(heading, justify="right", no_wrap=True)
    for row in report["alphas"]:
        table.add_row(f"{row['alpha']:g}", "yes" if row.get("bridges") else "no", f"{row['mean_layers']:.2f}",
                      f"{row.get('mean_bridged_runs', 0.0):.2f}", _times(row["ideal_speedup"]),
                      _times(row["measured_speedup"]), f"{row['efficiency']:.3f}")
    console.print(table)
    if "batches" in report:
        batches = Table(header_style="bold", box=None, padding=(0, 1))
        for heading in ("batch", "full tok/s", "d3 tok/s", "speedup"):
            batches.add_column(heading, justify="right", no_wrap=True)
        for row in report["batches"]:
            batches.add_row(str(row["batch_size"]), f"{row['full_tokens_per_s']:.1f}",
                            f"{row['d3_tokens_per_s']:.1f}", _times(row["speedup"]))
        console.print(batches)
    if "kv_cache" in report:
        kv = report["kv_cache"]
        console.print(Text(f"KV cache after {kv['tokens']} tokens: {kv['full_bytes'] / 2**20:.1f} MiB at full depth, "
                           f"{kv['d3_bytes'] / 2**20:.1f} MiB with D3 ({100 * kv['ratio']:.1f} %); allocated with "
                           f"spare room {kv['full_allocated_bytes'] / 2**20:.1f} and "
                           f"{kv['d3_allocated_bytes'] / 2**20:.1f} MiB"))
    if "first_token" in report:
        first = report["first_token"]
        console.print(Text(f"first token from a new process: cold {first['cold_s']:.1f} s (empty d3 cache), warm "
                           f"{first['warm_s']:.1f} s (exit {first['warm_exit_s']:.1f} s); d3 bench --task startup "
                           "says where it goes"))
    console.print(Text("limit = memory bandwidth ÷ weight bytes per decode step; ideal = T(L) / (T_fixed + "
                       "k̄·T_layer + r̄·T_bridge) with the fitted costs (r̄: bridged runs per step); measured: decode "
                       "time at full depth over decode time with D3 (prefill excluded); efficiency = measured / "
                       "ideal", style="dim"))


def print_long_prompt(console: Console, report: dict) -> None:
    """The load, and a long prompt's prefill and the decode after it, beside llama.cpp's."""
    if report.get("load_s") is not None:
        console.print(Text(f"load {report['load_s']:.1f} s · peak memory {report['peak_memory_bytes'] / 1e9:.2f} GB "
                           "(before any other weight kind loaded)"))
    long = report.get("long_prompt")
    if not long:
        return
    ours, theirs = long["d3"], long["llama_cpp"]
    parts = []
    for key, what in (("prefill_tokens_per_s", "prefill"), ("decode_tokens_per_s", "decode after it")):
        part = f"{what} d3 {ours[key]:.1f} tok/s"
        if "skipped" not in theirs:
            part += f" · llama.cpp {theirs[key]:.1f} ({long['vs_llama_cpp'][key]:.2f}×)"
        parts.append(part)
    console.print(Text(f"a {long['prompt_tokens']}-token prompt, full depth: " + "; ".join(parts)))
    if "skipped" in theirs:
        console.print(Text(f"llama.cpp at a long prompt: not timed ({theirs['skipped']})", style="dim"))


def print_weight_kinds(console: Console, report: dict) -> None:
    """The side-by-side table of weight kinds (and llama.cpp) against the bandwidth limit."""
    rows = report.get("weight_kinds") or []
    if not rows:
        return
    table = Table(title=f"decode tokens/s · memory bandwidth {report['bandwidth_gb_s']:.1f} GB/s",
                  header_style="bold", box=None, padding=(0, 1))
    table.add_column("", justify="left", overflow="fold", ratio=1)  # a long name wraps, the numbers never do
    for heading in ("k̄", "MB/step", "tok/s", "limit", "of limit", "× llama.cpp"):
        table.add_column(heading, justify="right", no_wrap=True)
    for row in rows:
        layers = "" if row["mean_layers"] is None else f"{row['mean_layers']:.2f}"
        ratio = "" if row.get("vs_llama_cpp") is None else f"{row['vs_llama_cpp']:.2f}"
        table.add_row(row["name"], layers, f"{row['step_bytes'] / 1e6:.1f}", f"{row['tokens_per_s']:.1f}",
                      f"{row['limit_tokens_per_s']:.1f}", f"{100 * row['of_limit']:.0f} %", ratio)
    console.print(table)
    for kind, why in (report.get("skipped_weight_kinds") or {}).items():
        console.print(Text(f"{kind}: not timed ({why})", style="dim"))
    skipped = (report.get("llama_cpp") or {}).get("skipped")
    if skipped:
        console.print(Text(f"llama.cpp: not timed ({skipped})", style="dim"))


def print_startup_report(console: Console, report: dict) -> None:
    """`d3 bench --task startup`: a new process's first token, through a server, and where a warm start goes."""
    first, served, stages = report["first_token"], report["server"], report["stages"]
    console.print(Text(f"d3 startup · {' '.join(report['model_args']) or 'the embedded model'} · medians of "
                       f"{report['rounds']}", style="bold"))
    console.print(Text(f"first token from a new process: cold {first['cold_s']:.2f} s (empty d3 cache), warm "
                       f"{first['warm_s']:.2f} s (exit {first['warm_exit_s']:.2f} s)"))
    cached = (f" ({served['cached_prompt_tokens']:.0f} of {served['prompt_tokens']:.0f} prompt tokens from its "
              f"prompt cache), {served['first_token_no_prompt_cache_s']:.2f} s without it; the server's own first "
              f"token {1000 * served['server_first_token_s']:.0f} ms, "
              f"{1000 * served['server_first_token_no_prompt_cache_s']:.0f} ms without"
              if "first_token_no_prompt_cache_s" in served else "")
    console.print(Text(f"through a running d3 serve: first token {served['first_token_s']:.2f} s{cached}"))
    console.print(Text(f"{served['calls']} one-prompt calls {served['server_calls_s']:.1f} s through the server "
                       f"against {served['local_calls_s']:.1f} s locally ({served['calls_speedup']:.1f}× faster)"))
    names = {"python_s": "python", "torch_import_s": "import torch", "cli_import_s": "import d3",
             "kernels_s": "kernels", "header_s": "header", "config_s": "config", "tokenizer_s": "tokenizer",
             "weights_s": "weights", "first_token_s": "first token"}
    parts = [f"{label} {stages[key]:.2f}" for key, label in names.items() if key in stages]
    other = stages["open_model_s"] - sum(stages.get(key, 0.0) for key in ("header_s", "config_s", "tokenizer_s",
                                                                           "weights_s"))
    console.print(Text(f"warm start, {stages['total_s']:.2f} s in one process: {' · '.join(parts)} · rest of the "
                       f"load {max(other, 0.0):.2f} s" + (" (through transformers)" if stages["transformers_imported"]
                                                          else "")))
