"""Everything d3 shows in a terminal: the only package that imports Rich, one module a view.

    common.py       consoles, plain writes, errors and warnings, depth bars, number formats
    live.py         the reply as it is generated, loading and bench progress, spinners, calibration stage lines
    replies.py      a reply's summary and stats, the chat's banner, turn summaries and settings
    evaluation.py   bench, lm-eval, profile-ppl and calibration results
    speed.py        bench --task speed's report
    server.py       d3 serve's request log

Model text is never parsed as markup: it is appended to `rich.text.Text` objects as plain strings. Commands use
`render.NAME` for every view, whichever module holds it. A view's module is imported when a name of it is
first asked for (PEP 562): lazy for start-up time, so a piped run that only writes plain text never imports Rich.
"""

from __future__ import annotations

import importlib

# each name this package offers and the module that holds it
VIEWS = {
    "BAR_WIDTH": "common",
    "BLOCKS": "common",
    "depth_bar": "common",
    "depth_block": "common",
    "depth_colour": "common",
    "print_download": "common",
    "print_error": "common",
    "print_warning": "common",
    "stderr_console": "common",
    "stdout_console": "common",
    "write_json_line": "common",
    "write_stderr_line": "common",
    "write_stdout": "common",
    "calibrated_schedule_text": "evaluation",
    "print_bench_table": "evaluation",
    "print_calibration": "evaluation",
    "print_calibration_made": "evaluation",
    "print_layer_profile": "evaluation",
    "print_lm_eval_table": "evaluation",
    "print_ppl_profile": "evaluation",
    "BenchProgress": "live",
    "LoadingBar": "live",
    "ReplyView": "live",
    "Spinner": "live",
    "StageLines": "live",
    "TokenPiece": "live",
    "calibration_estimate_text": "live",
    "calibration_text": "replies",
    "load_text": "replies",
    "print_chat_banner": "replies",
    "print_info": "replies",
    "print_session_stats": "replies",
    "print_settings": "replies",
    "print_stats": "replies",
    "print_summary": "replies",
    "print_turn_summary": "replies",
    "schedule_source_text": "replies",
    "stats_line": "replies",
    "stats_text": "replies",
    "summary_panel": "replies",
    "summary_rows": "replies",
    "tokens_per_s_text": "replies",
    "turn_summary": "replies",
    "server_event_text": "server",
    "server_log": "server",
    "print_long_prompt": "speed",
    "print_speed_report": "speed",
    "print_startup_report": "speed",
    "print_weight_kinds": "speed",
}


def __getattr__(name: str):
    module = VIEWS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(VIEWS))
