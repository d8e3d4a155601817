"""Everything d3 shows in a terminal. The only module that imports Rich.

Model text is never parsed as markup: it is appended to `rich.text.Text` objects as plain strings.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from d3cli.base.errors import OutputClosed

BLOCKS = "▁▂▃▄▅▆▇█"
BAR_WIDTH = 30


def stdout_console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def stderr_console(pinned: bool = False) -> Console:
    """A console on stderr; `pinned`: on the stderr of now, even if sys.stderr is swapped later (a progress line
    over a library whose own output is being dropped)."""
    return Console(file=sys.stderr if pinned else None, stderr=True, highlight=False, soft_wrap=False)


def write_stdout(text: str) -> None:
    """Plain text to stdout, flushed at once (pipes see each token as it comes)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise OutputClosed from None


def write_json_line(record: dict) -> None:
    write_stdout(json.dumps(record, ensure_ascii=False) + "\n")


def print_error(message: str) -> None:
    """One line on stderr: `d3: error: ...`."""
    sys.stderr.write(f"d3: error: {message}\n")
    sys.stderr.flush()


def print_warning(message: str) -> None:
    sys.stderr.write(f"d3: {message}\n")
    sys.stderr.flush()


def print_download(name: str, folder) -> None:
    print_warning(f"downloading {name} into {folder}")


def depth_colour(layers: int, num_layers: int) -> str:
    """Full depth is green; the shallower a token, the further toward orange."""
    share = max(0.0, min(1.0, layers / num_layers)) if num_layers else 1.0
    skipped = 1.0 - share
    red, green, blue = int(95 + 160 * min(1.0, 2 * skipped)), int(215 - 80 * skipped), int(95 - 95 * skipped)
    return f"#{red:02x}{green:02x}{blue:02x}"


def depth_block(layers: int, num_layers: int) -> str:
    """A one-character vertical bar whose height is layers / L (█ = every layer)."""
    share = max(0.0, min(1.0, layers / num_layers)) if num_layers else 1.0
    return BLOCKS[max(0, min(len(BLOCKS) - 1, round(share * len(BLOCKS)) - 1))]


def depth_bar(layers: int, num_layers: int, width: int = BAR_WIDTH) -> Text:
    """A horizontal bar of `layers` out of `num_layers`, with the count."""
    filled = round(width * layers / num_layers) if num_layers else width
    bar = Text("█" * filled, style=depth_colour(layers, num_layers))
    bar.append("░" * (width - filled), style="grey35")
    bar.append(f" {layers:>3}/{num_layers} layers")
    return bar


@dataclass
class TokenPiece:
    text: str
    layers: int


class ReplyView:
    """The live view of one reply on a terminal: streamed text, one depth bar per token, a status line."""

    def __init__(self, console: Console, num_layers: int, title: str = ""):
        self.console = console
        self.num_layers = num_layers
        self.title = title
        self.pieces: list[TokenPiece] = []
        self.tokens_per_s = 0.0
        self.live = Live(console=console, refresh_per_second=12, transient=True, auto_refresh=True,
                         get_renderable=self._live_renderable)

    def __enter__(self) -> ReplyView:
        self.live.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.live.stop()
        self.console.print(self.final_renderable())

    def add(self, event) -> None:
        self.pieces.append(TokenPiece(event.text, event.layers))
        if event.elapsed_s > 0:
            self.tokens_per_s = len(self.pieces) / event.elapsed_s

    def styled_text(self) -> Text:
        text = Text()
        for piece in self.pieces:
            text.append(piece.text, style=depth_colour(piece.layers, self.num_layers))
        return text

    def depth_strip(self) -> Text:
        strip = Text()
        for piece in self.pieces:
            strip.append(depth_block(piece.layers, self.num_layers), style=depth_colour(piece.layers, self.num_layers))
        return strip

    def _status(self) -> Text:
        status = Text(f"token {len(self.pieces):>4}  ", style="bold")
        if self.pieces:
            status.append_text(depth_bar(self.pieces[-1].layers, self.num_layers))
        status.append(f"  {self.tokens_per_s:6.1f} tok/s", style="dim")
        return status

    def _live_renderable(self):
        width = max(20, self.console.width)
        height = max(6, self.console.height - 4)
        lines = self.styled_text().wrap(self.console, width)
        strip_lines = self.depth_strip().wrap(self.console, width)
        text_room = max(1, height - 3)
        visible = Text("\n").join(lines[-text_room:]) if len(lines) else Text("")
        strip = strip_lines[-1] if len(strip_lines) else Text("")
        return Group(visible, Text(""), strip, self._status())

    def final_renderable(self):
        legend = Text(f"layers per token ({BLOCKS[-1]} = all {self.num_layers}, {BLOCKS[0]} = few):", style="dim")
        return Group(self.styled_text(), Text(""), legend, self.depth_strip())


class LoadingBar:
    """A progress bar of the decoder layers while a model loads, on a terminal only (`progress` is None elsewhere:
    a script's stderr gets no bar)."""

    def __init__(self, name: str):
        self.name, self.bar, self.task = name, None, None

    def __enter__(self) -> LoadingBar:
        return self

    @property
    def progress(self):
        return self.update if sys.stderr.isatty() else None

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = Progress(TextColumn("loading {task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=stderr_console(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.name, total=total)
        self.bar.update(self.task, completed=done)

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.stop()


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def write_stderr_line(text: str) -> None:
    """A plain line on stderr, unwrapped (a pipe reads it whole)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def calibration_estimate_text(model_name: str, estimate: dict[str, float]) -> str:
    """One line before calibrating: about how long each stage will take here."""
    names = {"corpus": "replies", "profile": "layer profile", "bridges": "bridges", "schedule": "schedule, at most"}
    parts = ", ".join(f"{names[stage]} {_duration(seconds)}" for stage, seconds in estimate.items())
    return f"calibrating {model_name}: about {_duration(sum(estimate.values()))} here ({parts})"


class StageLines:
    """One line on stderr as each calibration stage starts and when it ends (where no progress bar is drawn)."""

    def __init__(self, labels: dict[str, str]):
        self.labels, self.current, self.started = labels, None, 0.0

    def start(self, stage: str, total: int, estimate: float | None) -> None:
        self.finish()
        self.current, self.started = stage, time.perf_counter()
        about = f", about {_duration(estimate)}" if estimate is not None else ""
        sys.stderr.write(f"d3: calibrate: {self.labels[stage]}: {total} to do{about}\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.current is not None:
            sys.stderr.write(f"d3: calibrate: {self.labels[self.current]}: done in "
                             f"{_duration(time.perf_counter() - self.started)}\n")
            sys.stderr.flush()
        self.current = None


class Spinner:
    """A transient status line while something runs that prints nothing (the --compare baseline)."""

    def __init__(self, console: Console, message: str):
        self.status = console.status(message)

    def __enter__(self) -> Spinner:
        self.status.start()
        return self

    def update(self, message: str) -> None:
        self.status.update(message)

    def __exit__(self, *exc_info) -> None:
        self.status.stop()


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
    return (f"{totals['turns']} replies, {totals['generated_tokens']} tokens, mean layers "
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


class BenchProgress:
    """One progress bar per method with its ETA, on stderr."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> BenchProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.progress.stop()

    def add(self, key: str, label: str, total: int, completed: int) -> None:
        self.tasks[key] = self.progress.add_task(label, total=total, completed=completed, start=False)

    def start(self, key: str) -> None:
        self.progress.start_task(self.tasks[key])

    def advance(self, key: str, amount: int = 1) -> None:
        self.progress.advance(self.tasks[key], amount)


def _points(value) -> str:
    return "" if value is None else f"{value:+.1f}"


def _times(value) -> str:
    return "" if value is None else f"{value:.2f}×"


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


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
        console.print(Text(f"the d3 schedule: from the {source}", style="dim"))
    console.print(Text(f"per-example results: {summary['output']}", style="dim"))


def _signed(value) -> str:
    return "–" if value is None else f"{value:+.2f}"


def _fraction(value) -> str:
    return "–" if value is None else f"{value:.2f}"


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


def _metric(value: float, sign: str = "") -> str:
    return f"{value:{sign}.3f}" if abs(value) < 1000 else f"{value:{sign}.4g}"


def _mean_of(values) -> float | None:
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


def _bar_with_marker(value: float, marker: float | None, scale: float, width: int = BAR_WIDTH) -> Text:
    """A horizontal bar of `value` (full width = `scale`), with a ┃ where `marker` falls."""
    filled = max(0, min(width, round(width * value / scale))) if scale > 0 else 0
    cells = ["█"] * filled + [" "] * (width - filled)
    styles = ["cyan"] * filled + [""] * (width - filled)
    if marker is not None and scale > 0:
        spot = max(0, min(width - 1, round(width * marker / scale) - 1))
        cells[spot], styles[spot] = "┃", "bold magenta"
    text = Text()
    for cell, style in zip(cells, styles):
        text.append(cell, style=style)
    return text


def _ppl(value: float) -> str:
    return f"{value:.2f}" if value < 1000 else f"{value:.3g}"


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
                           f"{first['warm_s']:.1f} s (exit {first['warm_exit_s']:.1f} s); importing torch and "
                           f"transformers alone takes {first['imports_s']:.1f} s"))
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


# --- d3 serve -------------------------------------------------------------------------------------------------------


def server_event_text(record: dict) -> Text:
    """One line of `d3 serve`'s terminal view for one log record (a request, or the server starting or stopping)."""
    clock = Text(f"{record['time'][11:19]} ", style="dim")
    event = record.get("event")
    if event == "listening":
        return clock + Text.assemble(("d3 serve", "bold cyan"), f" · listening on {record['url']} · loading "
                                     f"{record['model']}…")
    if event == "ready":
        return clock + Text(f"ready: {record['model']}, {record['num_layers']} layers, loaded in "
                            f"{record['load_s']:.1f} s", style="cyan")
    if event != "request":
        return clock + Text(str(event), style="cyan")
    status = record.get("status")
    colour = "green" if status is not None and status < 400 else "yellow" if status in (413, 429, 499, 503) else "red"
    line = clock + Text.assemble((f"{record['method']:<4} ", "bold"), f"{record['path']} ",
                                 (str(status), f"bold {colour}"))
    if "completion_tokens" in record:
        line.append(f"  {record['prompt_tokens']}+{record['completion_tokens']} tok  "
                    f"{record['mean_layers']:.1f} layers  {record['tokens_per_s']:.1f} tok/s")
    line.append(f"  {record['time_s']:.2f} s", style="dim")
    if record.get("batch"):
        line.append(f"  in a batch of {record['batch']}", style="dim")
    if record.get("disconnected"):
        line.append(f"  client left, stopped {record.get('steps_after_cancel')} step(s) later", style="yellow")
    if record.get("error"):
        line.append(f"  {record['error']}", style="dim")
    return line


def server_log(log_format: str):
    """The function `d3 serve` hands each log record to: a Rich line on stderr, or (`json`) one JSON object a
    line on stderr. Records get the time they were written."""
    import datetime
    import threading

    console = stderr_console()
    lock = threading.Lock()  # records come from the event loop and from the loading thread

    def log(record: dict) -> None:
        record = {"time": datetime.datetime.now().astimezone().isoformat(timespec="milliseconds"), **record}
        with lock:
            if log_format == "json":
                sys.stderr.write(json.dumps(record, ensure_ascii=False) + "\n")
                sys.stderr.flush()
            else:
                console.print(server_event_text(record), soft_wrap=True)

    return log
