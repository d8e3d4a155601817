"""A reply's summary and stats line, and the chat's banner, turn summaries and settings."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text


def summary_rows(record: dict) -> list[tuple[str, str]]:
    """The label/value rows of a reply's summary, from its JSON record."""
    num_layers = record["num_layers"]
    rows = [
        ("schedule", f"α={record['alpha']}, min-layers {record['min_layers']}, head {record['head']}, "
                     f"tail {record['tail']}, warmup {record['warmup']}, skip order {record['skip_order']}"
                     + schedule_source_text(record)),
        *([("warning", record["schedule_warning"])] if record.get("schedule_warning") else []),
        ("calibration", calibration_text(record)),
        *([("weights", record["weights_detail"])] if record.get("weights_detail") else []),
        ("tokens", f"{record['generated_tokens']} ({record['finish_reason']})"),
        ("mean layers", f"{record['mean_layers']:.1f} of {num_layers}"),
        ("layer compute", f"{100 * record['layer_ratio']:.1f}% of full depth"),
        ("tokens/s", tokens_per_s_text(record)),
        *([("load", load_text(record))] if record.get("load_s") is not None else []),
        *([("served by", record["server"])] if record.get("server") else []),
        ("speedup (estimated)", f"{record['estimated_speedup']:.2f}× from layer counts; an upper bound"),
    ]
    if "baseline" in record:
        baseline = record["baseline"]
        rows += [
            ("full depth", f"{baseline['generated_tokens']} tokens, {baseline['tokens_per_s']:.1f} tokens/s"),
            ("speedup (measured)", f"{record['measured_speedup']:.2f}× wall clock, tokens/s over full depth"),
            ("identical to full depth", "yes" if record["identical"] else "no"),
        ]
    return rows


def tokens_per_s_text(record: dict) -> str:
    """Decode and prefill rates apart, then the whole reply's."""
    parts = []
    if record.get("decode_tokens_per_s") is not None:
        parts.append(f"{record['decode_tokens_per_s']:.1f} decoding")
    if record.get("prefill_tokens_per_s") is not None:
        parts.append(f"{record['prefill_tokens_per_s']:.1f} prefill ({record['prompt_tokens']} prompt tokens)")
    parts.append(f"{record['tokens_per_s']:.1f} over the whole reply")
    return ", ".join(parts)


def load_text(record: dict) -> str:
    peak = record.get("peak_memory_bytes")
    return f"{record['load_s']:.1f} s" + (f", peak memory {peak / 2**30:.2f} GiB" if peak else "")


def schedule_source_text(record: dict) -> str:
    """Where a reply's α and min-layers came from, as the summary's schedule row ends."""
    source = record.get("schedule_source")
    if source == "option":
        return " (as set)"
    if source == "calibration":
        if record.get("alpha") == 1.0:
            return " (full depth: the model's calibration found no schedule whose replies stay within its budget)"
        return " (chosen by the model's calibration)"
    if source == "default":
        if record.get("calibration") is None:
            return (" (d3's conservative default for a model it has not calibrated: d3 calibrate chooses this "
                    "model's)")
        return (" (d3's conservative default: this calibration chose none; "
                "d3 calibrate --schedule-only chooses one)")
    return ""


def calibration_text(record: dict) -> str:
    """Which calibration a reply used and what its bridges did, or how to make one."""
    if record.get("calibration") is None:
        return "none for this model (d3 calibrate fits its layer order and bridges)"
    made_on = record.get("calibration_weights")
    name = record["calibration"]
    if made_on and record.get("weights") and made_on != record["weights"]:
        name += f" (made on {made_on} weights)"
    if not record.get("bridges"):
        return f"{name}, bridges off"
    runs = ", ".join(f"{first}" if first == last else f"{first}–{last}" for first, last in record["bridged_runs"])
    text = f"{name}, bridges over layers {runs}" if runs else f"{name}, bridges on"
    if record.get("unbridged_runs"):
        text += f" (no bridge for {len(record['unbridged_runs'])} run(s): skipped plainly)"
    return text


def summary_panel(record: dict) -> Panel:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for label, value in summary_rows(record):
        table.add_row(label, value)
    return Panel(table, title="D3 summary", expand=False, border_style="cyan")


def stats_line(record: dict) -> str:
    """The summary as one plain line, for stderr in scripts (`--stats`)."""
    return "d3: " + "; ".join(f"{label} {value}" for label, value in summary_rows(record))


def print_summary(console: Console, record: dict) -> None:
    console.print(summary_panel(record))


def print_stats(record: dict) -> None:
    """The summary for scripts: one plain line on stderr."""
    sys.stderr.write(stats_line(record) + "\n")
    sys.stderr.flush()


def turn_summary(record: dict) -> str:
    """One line after each chat reply."""
    return (f"{record['generated_tokens']} tokens ({record['finish_reason']}) · "
            f"{record['mean_layers']:.1f}/{record['num_layers']} layers · {record['tokens_per_s']:.1f} tok/s · "
            f"estimated speedup {record['estimated_speedup']:.2f}×")


def print_turn_summary(console: Console, record: dict) -> None:
    console.print(Text(turn_summary(record), style="dim"))


def print_chat_banner(console: Console, model_name: str, settings_text: str) -> None:
    console.print(Text.assemble(("d3 chat", "bold cyan"), f" · {model_name}"))
    console.print(Text(f"{settings_text} · /help for commands · Ctrl-D to leave", style="dim"))


def print_info(console: Console, message: str) -> None:
    console.print(Text(message, style="cyan"))


def stats_text(totals: dict) -> str:
    replies = "reply" if totals["turns"] == 1 else "replies"
    return (f"{totals['turns']} {replies}, {totals['generated_tokens']} tokens, mean layers "
            f"{totals['mean_layers']:.1f} of {totals['num_layers']} ({100 * totals['layer_ratio']:.1f}% of full "
            f"depth), {totals['tokens_per_s']:.1f} tokens/s, estimated speedup {totals['estimated_speedup']:.2f}×")


def print_session_stats(console: Console, totals: dict) -> None:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("replies", str(totals["turns"]))
    table.add_row("tokens", str(totals["generated_tokens"]))
    table.add_row("mean layers", f"{totals['mean_layers']:.1f} of {totals['num_layers']}")
    table.add_row("layer compute", f"{100 * totals['layer_ratio']:.1f}% of full depth")
    table.add_row("tokens/s", f"{totals['tokens_per_s']:.1f}")
    table.add_row("speedup (estimated)", f"{totals['estimated_speedup']:.2f}× from layer counts; an upper bound")
    console.print(Panel(table, title="session", expand=False, border_style="cyan"))


def print_settings(console: Console, rows: dict[str, dict[str, dict]]) -> None:
    """`d3 config show`: each subcommand's settings with their sources."""
    for command, settings in rows.items():
        table = Table(title=f"d3 {command}", title_justify="left", show_edge=False, header_style="bold")
        table.add_column("key")
        table.add_column("value")
        table.add_column("from", style="dim")
        for key, setting in settings.items():
            source = setting["source"]
            table.add_row(key, json.dumps(setting["value"], ensure_ascii=False),
                          Text(source, style="dim" if source == "default" else "cyan"))
        console.print(table)
