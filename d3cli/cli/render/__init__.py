"""Everything d3 shows in a terminal: the only package that imports Rich, one module a view.

    common.py       consoles, plain writes, errors and warnings, depth bars, number formats
    live.py         the reply as it is generated, loading and bench progress, spinners, calibration stage lines
    replies.py      a reply's summary and stats, the chat's banner, turn summaries and settings
    evaluation.py   bench, lm-eval, profile-ppl and calibration results
    speed.py        bench --task speed's report
    server.py       d3 serve's request log

Model text is never parsed as markup: it is appended to `rich.text.Text` objects as plain strings. Commands use
`render.NAME` for every view, whichever module holds it.
"""

from d3cli.cli.render.common import (  # noqa: F401
    BAR_WIDTH,
    BLOCKS,
    depth_bar,
    depth_block,
    depth_colour,
    print_download,
    print_error,
    print_warning,
    stderr_console,
    stdout_console,
    write_json_line,
    write_stderr_line,
    write_stdout,
)
from d3cli.cli.render.evaluation import (  # noqa: F401
    calibrated_schedule_text,
    print_bench_table,
    print_calibration,
    print_calibration_made,
    print_layer_profile,
    print_lm_eval_table,
    print_ppl_profile,
)
from d3cli.cli.render.live import (  # noqa: F401
    BenchProgress,
    LoadingBar,
    ReplyView,
    Spinner,
    StageLines,
    TokenPiece,
    calibration_estimate_text,
)
from d3cli.cli.render.replies import (  # noqa: F401
    calibration_text,
    load_text,
    print_chat_banner,
    print_info,
    print_session_stats,
    print_settings,
    print_stats,
    print_summary,
    print_turn_summary,
    schedule_source_text,
    stats_line,
    stats_text,
    summary_panel,
    summary_rows,
    tokens_per_s_text,
    turn_summary,
)
from d3cli.cli.render.server import (  # noqa: F401
    server_event_text,
    server_log,
)
from d3cli.cli.render.speed import (  # noqa: F401
    print_long_prompt,
    print_speed_report,
    print_startup_report,
    print_weight_kinds,
)
