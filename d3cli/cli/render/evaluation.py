"""Bench, lm-eval, profile-ppl and calibration results as tables."""

from __future__ import annotations

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from d3cli.cli.render.common import (
    _bar_with_marker,
    _fraction,
    _mean_of,
    _metric,
    _percent,
    _points,
    _ppl,
    _signed,
    _times,
)


def print_bench_table(console: Console, summary: dict) -> None:
    """`d3 bench`'s summary: one row per method (every number is also in --json)."""
    methods = summary["methods"]
    free = summary["task"] == "replies"  # everyday prompts: fidelity columns instead of accuracy ones
    table = Table(title=f"d3 bench · {summary['task']} · {summary['model']} · {summary['examples']} examples",
                  title_justify="left", header_style="bold", box=None, padding=(0, 1))
    table.add_column("method", no_wrap=True)
    headings = (["answers", "rep", "Δrep", "loops", "ΔNLL", "leaves", "layers", "speedup"] if free
                else ["strict", "flex", "Δpts", "agree", "rep", "loops", "layers", "tokens", "tok/s", "speedup",
                      "decode"])
    for heading in headings:
        table.add_column(heading, justify="right", no_wrap=True)
    for row in methods:
        loops = "–" if row.get("loops") is None else f"{row['loops']}/{row['examples']}"
        if free:
            leaves = row.get("median_first_difference")
            cells = [_percent(row["accuracy"]), _fraction(row.get("repetition")),
                     _signed(row.get("delta_repetition")), loops, _signed(row.get("delta_nll")),
                     "–" if leaves is None else str(leaves)]
        else:
            cells = [_percent(row["accuracy"]), _percent(row["accuracy_flexible"]), _points(row["delta_points"]),
                     _percent(row["agreement"]), _percent(row.get("repetition")), loops]
        cells += [f"{row['mean_layers']:.1f}", *([] if free else [str(row["generated_tokens"]),
                                                                 f"{row['tokens_per_s']:.1f}"]),
                  _times(row["measured_speedup"]),
                  *([] if free else [_times(row.get("decode_speedup"))])]
        table.add_row(row["label"], *cells)
    console.print(table)
    if free:
        legend = ("answers: replies with their prompt's answer (a number or word; prompts that have one); rep: "
                  "repeated 4-grams of the replies; Δrep: the mean change from full "
                  "depth's reply to the same prompt (the largest in --json); loops: replies repeating themselves where full depth's do not "
                  "(5 points more of their 4-grams); ΔNLL: the full-depth model's NLL per token of the replies "
                  "minus of its own; leaves: the median position where a reply leaves full depth's words")
    else:
        legend = ("strict, flex: accuracy by the two answer extractors; Δpts: strict accuracy minus full depth's; "
                  "agree: same flexible answer as full depth; rep: repeated 4-grams of the replies; loops: replies "
                  "repeating themselves where full depth's do not")
    console.print(Text(legend + "; static and linear use the mean depth of the d3 run with their α; speedup: "
                       "tokens/s over full depth's, prefill included" + ("" if free else
                                                                         "; decode: the same without the prefill"),
                       style="dim"))
    source = summary.get("schedule_source")
    if summary["methods"] and all(row["method"] == "full" for row in summary["methods"]):
        console.print(Text("only full depth ran: the d3 schedule is full depth (α 1"
                           + (", the model's calibration found none within its budget" if source == "calibration"
                              else "") + "); --alpha 0.98 compares D3 with it", style="dim"))
    elif source == "default":
        why = "its calibration chose none" if summary.get("calibration") else "the model is not calibrated"
        console.print(Text(f"the d3 schedule: d3's default ({why}: d3 calibrate chooses one)", style="dim"))
    elif source is not None:
        chosen_by = {"option": "--alpha and --min-layers", "calibration": "the model's calibration"}.get(source, source)
        console.print(Text(f"the d3 schedule: chosen by {chosen_by}", style="dim"))
    console.print(Text(f"per-example results: {summary['output']}", style="dim"))


def print_lm_eval_table(console: Console, summary: dict) -> None:
    """`d3 bench --task lm-eval:...`: lm-eval's metrics, a row per task metric and a column per method (change
    from full depth in brackets), then each method's depth and time."""
    documents = ", ".join(f"{task} {count}" for task, count in summary["documents"].items())
    methods = summary["methods"]
    table = Table(title=f"d3 bench · {summary['model']} · lm-eval documents: {documents}", title_justify="left",
                  header_style="bold", box=None, padding=(0, 1))
    table.add_column("task · metric", no_wrap=True)
    for row in methods:
        table.add_column(row["label"], justify="right", no_wrap=True)
    for task in summary["tasks"]:
        for name in (methods[0]["metrics"].get(task, {}) if methods else {}):
            cells = [f"{task} · {name}"]
            for row in methods:
                value = row["metrics"].get(task, {}).get(name)
                delta = (row["delta"] or {}).get(task, {}).get(name) if row["method"] != "full" else None
                cells.append("–" if value is None else _metric(value) + (f" ({_metric(delta, '+')})"
                                                                          if delta is not None else ""))
            table.add_row(*cells)
    for heading, cell in (
        ("agreement", lambda row: _percent(_mean_of((row["agreement"] or {}).values()))),
        ("mean layers", lambda row: f"{row['mean_layers']:.1f}"),
        ("tokens", lambda row: str(row["tokens"])),
        ("time", lambda row: f"{row['seconds']:.1f} s"),
        ("speedup", lambda row: _times(row["time_ratio"])),
    ):
        table.add_row(Text(heading, style="dim"), *(cell(row) for row in methods))
    console.print(table)
    console.print(Text("metrics as lm-eval computes them; agreement: same filtered answer as full depth; mean layers: "
                       "over every token generated or scored; speedup: full depth's time over this run's",
                       style="dim"))
    console.print(Text(f"summary: {summary['output']}", style="dim"))


def print_ppl_profile(console: Console, result: dict) -> None:
    """profile-ppl's per-position chart: one row per position bucket, a bar of its perplexity with the fit marked."""
    profile = result["profile"]
    table = Table(title=f"d3 profile-ppl · {result['corpus']} · {result['model']} · {profile['texts']} texts, "
                        f"{profile['tokens']} tokens", title_justify="left", header_style="bold", box=None,
                  padding=(0, 1))
    scale = max((max(row["perplexity"], row["fit"] or 0.0) for row in profile["buckets"]), default=1.0)
    rows = []
    for index, row in enumerate(profile["buckets"]):
        cells = [f"{row['first']}–{row['last']}", str(row["count"]), f"{row['mean_nll']:.3f}",
                 _ppl(row["perplexity"]),
                 f"{_ppl(row['perplexity_low'])}–{_ppl(row['perplexity_high'])}"]
        cells += [f"{decayed['buckets'][index]['nll_increase']:+.3f}" for decayed in profile["d3"]]
        rows.append((cells, _bar_with_marker(row["perplexity"], row["fit"], scale, 12)))
    headings = ["positions", "tokens", "NLL", "ppl", "95% CI", *(f"Δ{row['label']}" for row in profile["d3"])]
    for column, heading in enumerate(headings):  # numbers never shrink; the bar does
        width = max([len(heading), *(len(cells[column]) for cells, _ in rows)])
        table.add_column(heading, justify="left" if column == 0 else "right", no_wrap=True, min_width=width)
        if column == 4:
            table.add_column("ppl ┃ fit", no_wrap=True, min_width=8)
    for cells, bar in rows:
        table.add_row(*cells[:5], bar, *cells[5:])
    console.print(table)
    fit = profile["fit"]
    if fit:
        console.print(Text(f"fit: ppl(i) ≈ {fit['c']:.3f} + {fit['a']:.3f}·(i+1)^(−{fit['b']:.3f})   "
                           f"R² {fit['r2']:.3f}, RMSE {fit['rmse']:.3f} over {fit['points']} positions"))
    else:
        console.print(Text("fit: too few positions with two or more tokens for a power-law fit", style="dim"))
    calibration = result.get("calibration")
    console.print(Text(f"calibration: {calibration}, bridges {'on' if result.get('bridges') else 'off'}"
                       if calibration else "calibration: none for this model (d3 calibrate fits its layer order and "
                       "bridges)", style="dim"))
    for decayed in profile["d3"]:
        bridged = ", bridged" if decayed.get("bridges") else ""
        console.print(Text(f"{decayed['label']} ({decayed['skip_order']}{bridged}): mean "
                           f"{decayed['mean_layers']:.2f} layers, "
                           f"NLL {decayed['mean_nll']:.4f} ({decayed['nll_increase']:+.4f} nats over full depth "
                           f"{profile['mean_nll']:.4f}), same top token as full depth at "
                           f"{100 * decayed['top1_agreement']:.1f}% of positions"))


def print_layer_profile(console: Console, result: dict) -> None:
    """profile-ppl's layer table: block influence and the NLL cost of skipping each layer alone late in replies."""
    layers = result["layers"]
    table = Table(title=f"layer profile · late positions ≥ {result['late_from']}", title_justify="left",
                  header_style="bold", box=None, padding=(0, 1))
    for heading, justify in (("layer", "right"), ("kind", "left"), ("influence", "right"), ("", "left"),
                             ("ΔNLL", "right"), ("", "left"), ("drop", "right")):
        table.add_column(heading, justify=justify, no_wrap=True, min_width=len(heading))
    top_influence = max((row["block_influence"] for row in layers), default=1.0) or 1.0
    top_increase = max((max(row["nll_increase"], 0.0) for row in layers), default=1.0) or 1.0
    for row in layers:
        table.add_row(str(row["layer"]), "core" if row["core"] else "flex", f"{row['block_influence']:.4f}",
                      _bar_with_marker(row["block_influence"], None, top_influence, 16),
                      f"{row['nll_increase']:+.4f}", _bar_with_marker(max(row["nll_increase"], 0.0), None,
                                                                     top_increase, 16),
                      "" if row["core"] else str(row["importance_rank"]))
    console.print(table)
    console.print(Text("influence: 1 − cos(layer input, output); ΔNLL: nats per late token when the layer alone is "
                       "skipped; drop: the order --skip-order importance drops flex layers in (0 first)", style="dim"))


def print_calibration(console: Console, calibration: dict) -> None:
    costs, chosen = calibration["step_costs"], calibration["recommended"]
    console.print(Text(f"step cost on this machine: T(k) ≈ {costs['t_fixed_ms']:.2f} ms + k × "
                       f"{costs['t_layer_ms']:.3f} ms (R² {costs['r2']:.3f})"))
    table = Table(title=f"calibration · target {calibration['target']} · {calibration['reply_tokens']}-token replies",
                  title_justify="left", header_style="bold", box=None, padding=(0, 1))
    for heading in ("α", "min layers", "layer ratio", "speedup (pred.)", "ΔNLL (pred.)", ""):
        table.add_column(heading, justify="right", no_wrap=True)
    for row in calibration["candidates"]:
        is_chosen = row["alpha"] == chosen["alpha"] and row["min_layers"] == chosen["min_layers"]
        table.add_row(f"{row['alpha']:.4f}", str(row["min_layers"]), f"{row['predicted_layer_ratio']:.3f}",
                      f"{row['predicted_speedup']:.3f}×", f"{row['predicted_nll_increase']:+.4f}",
                      "← recommended" if is_chosen else "", style="bold" if is_chosen else None)
    console.print(table)
    check = calibration["check"]
    console.print(Text(f"recommended: --alpha {chosen['alpha']:.4f} --min-layers {chosen['min_layers']}   "
                       f"decode speedup predicted {chosen['predicted_speedup']:.3f}×, measured "
                       f"{check['measured_speedup']:.3f}×; ΔNLL predicted {chosen['predicted_nll_increase']:+.4f}, "
                       f"measured {check['measured_nll_increase']:+.4f} nats ({check['texts']} held-out texts)",
                       style="bold green"))


def calibrated_schedule_text(schedule: dict) -> str:
    """The schedule a calibration chose, in one line: α and floor, predicted speedup, and its replies' fidelity."""
    layers = schedule["step_costs"].get("num_layers")
    noise = schedule.get("noise")
    noise_text = (f" · full depth itself, decoded alone instead of batched: {noise['prompts'] - noise['identical']} "
                  f"of {noise['prompts']} replies change, {noise['loops']} loop(s)") if noise else ""
    if schedule["fidelity"] is None:
        return (f"full depth: no candidate's replies stayed within {schedule['budget']['nll']:g} nats/token "
                f"of full depth's without looping{noise_text}")
    fidelity = schedule["fidelity"]
    return (f"α {schedule['alpha']:g}, floor {schedule['min_layers']}" + (f" of {layers}" if layers else "")
            + f" · predicted {schedule['predicted_speedup']:.2f}× · replies {fidelity['delta_nll']:+.3f} nats/token, "
            f"repetition {fidelity['delta_repetition']:+.3f} (budget {schedule['budget']['nll']:g}){noise_text}")


def print_calibration_made(console: Console, record: dict) -> None:
    """`d3 calibrate`'s closing summary."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    runs = ", ".join(f"{first}" if first == last else f"{first}–{last}" for first, last in record["bridged_runs"])
    table.add_row("written to", record["calibration"])
    table.add_row("corpus", f"{record['texts']} replies, {record['tokens']} tokens")
    table.add_row("skip order", "importance: " + " ".join(str(layer) for layer in record["drop_order"]))
    table.add_row("bridges", f"{len(record['bridged_runs'])} runs ({runs}), "
                             f"{record['bridge_bytes'] / 2**20:.1f} MiB"
                             + (f", rank {record['rank']}" if record["rank"] else ""))
    schedule = record.get("schedule")
    if schedule:
        table.add_row("schedule", calibrated_schedule_text(schedule))
    table.add_row("time", ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in record["seconds"].items()))
    if record.get("time_limit_cost"):
        table.add_row("time limit", record["time_limit_cost"])
    console.print(Panel(table, title=f"d3 calibrate · {record['model']}", expand=False, border_style="cyan"))
