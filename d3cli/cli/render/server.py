"""`d3 serve`'s request log lines."""

from __future__ import annotations

import json
import sys

from rich.text import Text

from d3cli.cli.render.common import (
    stderr_console,
)


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
    if record.get("cached_tokens"):
        line.append(f"  {record['cached_tokens']} prompt tok cached", style="dim")
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
