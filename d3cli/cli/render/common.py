"""Consoles, plain writes, errors and warnings, and the small pieces every view draws (depth bars, numbers)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from d3cli.base.errors import OutputClosed

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

# Rich is imported inside the functions that draw (lazy for start-up time): a piped run writes plain text only.

BLOCKS = "▁▂▃▄▅▆▇█"


BAR_WIDTH = 30


def stdout_console() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False)


def stderr_console(pinned: bool = False) -> Console:
    """A console on stderr; `pinned`: on the stderr of now, even if sys.stderr is swapped later (a progress line
    over a library whose own output is being dropped)."""
    from rich.console import Console

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
    from rich.text import Text

    filled = round(width * layers / num_layers) if num_layers else width
    bar = Text("█" * filled, style=depth_colour(layers, num_layers))
    bar.append("░" * (width - filled), style="grey35")
    bar.append(f" {layers:>3}/{num_layers} layers")
    return bar


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def write_stderr_line(text: str) -> None:
    """A plain line on stderr, unwrapped (a pipe reads it whole)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _points(value) -> str:
    return "" if value is None else f"{value:+.1f}"


def _times(value) -> str:
    return "" if value is None else f"{value:.2f}×"


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _signed(value) -> str:
    return "–" if value is None else f"{value:+.2f}"


def _fraction(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _metric(value: float, sign: str = "") -> str:
    return f"{value:{sign}.3f}" if abs(value) < 1000 else f"{value:{sign}.4g}"


def _mean_of(values) -> float | None:
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


def _bar_with_marker(value: float, marker: float | None, scale: float, width: int = BAR_WIDTH) -> Text:
    """A horizontal bar of `value` (full width = `scale`), with a ┃ where `marker` falls."""
    from rich.text import Text

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
