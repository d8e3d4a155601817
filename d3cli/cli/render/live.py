"""Views that update while work goes on: the reply as it is generated, loading and bench progress, spinners."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from d3cli.cli.render.common import (
    BLOCKS,
    _duration,
    depth_bar,
    depth_block,
    depth_colour,
    stderr_console,
)


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
