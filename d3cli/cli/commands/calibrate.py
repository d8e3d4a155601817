"""`d3 calibrate`: fit one model's layer profile and bridges on its own replies, and choose its schedule; every
command then uses them.

A subcommand of its own rather than a mode of profile-ppl: profile-ppl measures a corpus the user brings and
reports; calibrate makes the one artifact the other commands pick up by themselves, from text d3 brings, with a
progress bar and nothing to choose. Parse, call `calibrate.calibrate`, render.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from d3cli.cli import render
from d3cli.cli.options import ModelArgs, batch_size_option, flag, option, output_option, uses_option_groups
from d3cli.evaluation.builtin_prompts import SCHEDULE_PROMPTS
from d3cli.evaluation.calibrate.defaults import DEFAULT_NLL_BUDGET, SCHEDULE_TOKENS

CALIBRATION_PANEL = "Calibration"


BatchSizeOption = batch_size_option("Replies generated at once.", CALIBRATION_PANEL)
ScheduleOnlyOption = flag("--schedule-only", "Choose the schedule again for the model's calibration as it is "
                          "(e.g. with another --budget): its order and bridges stay.", CALIBRATION_PANEL)
OutputOption = output_option("Write the calibration here instead of the user cache "
                             "(then pass it with --calibration).")
JsonOption = flag("--json", "Print what was made as JSON.")
PromptsOption = option(int, "How many of the 116 built-in prompts the bridges are fitted on (fewer: faster, weaker "
                            "bridges).", CALIBRATION_PANEL)
ReplyTokensOption = option(int, "Most tokens of each of the model's replies.", CALIBRATION_PANEL)
ProfileTextsOption = option(int, "Replies the layer profile (the importance order) is measured on.", CALIBRATION_PANEL)
RankOption = option(Optional[int], "Low-rank bridges of this rank (default: full rank). For large models: a full "
                                   "bridge is hidden² numbers per skipped run.", CALIBRATION_PANEL, show_default=False)
RidgeOption = option(float, "Ridge strength, relative to the mean diagonal of XᵀX.", CALIBRATION_PANEL)
CoreHeadOption = option(int, "First layers that are never skipped (bridges are fitted for the others).",
                        CALIBRATION_PANEL)
CoreTailOption = option(int, "Last layers that are never skipped.", CALIBRATION_PANEL)
BudgetOption = option(float, "The chosen schedule's fidelity budget: its replies to held-out prompts at most this "
                             "many nats per token above full depth's (the full-depth model's NLL), and none looping "
                             "where full depth's does not.", CALIBRATION_PANEL)
SchedulePromptsOption = option(int, "Held-out prompts each candidate schedule answers.", CALIBRATION_PANEL)
ScheduleTokensOption = option(int, "Most tokens of each such reply.", CALIBRATION_PANEL)
TimeLimitOption = option(Optional[str], "Fit the calibration in about this long (90s, 30m, 2h, 1h30m): from the costs"
                                        " it measures first, d3 cuts the prompts, profile texts and held-out prompts "
                                        "by one fraction until its estimate fits, and says what that costs (weaker "
                                        "bridges, a less certain schedule).", CALIBRATION_PANEL, show_default=False)
ScheduleOnlyCalibrationOption = option(Optional[Path], "With --schedule-only: the calibration to choose for "
                                       "(default: the model's own, as every command finds it).", CALIBRATION_PANEL,
                                       show_default=False)


@uses_option_groups
def calibrate(
    model: ModelArgs = ModelArgs(),
    prompts: PromptsOption = 64,
    reply_tokens: ReplyTokensOption = 256,
    batch_size: BatchSizeOption = 16,
    profile_texts: ProfileTextsOption = 16,
    rank: RankOption = None,
    ridge: RidgeOption = 0.1,
    head: CoreHeadOption = 2,
    tail: CoreTailOption = 2,
    budget: BudgetOption = DEFAULT_NLL_BUDGET,
    schedule_prompts: SchedulePromptsOption = SCHEDULE_PROMPTS,
    schedule_tokens: ScheduleTokensOption = SCHEDULE_TOKENS,
    time_limit: TimeLimitOption = None,
    schedule_only: ScheduleOnlyOption = False,
    calibration: ScheduleOnlyCalibrationOption = None,
    output: OutputOption = None,
    as_json: JsonOption = False,
) -> None:
    """Calibrate a model for D3: its layer order, bridges over skipped layers, and schedule.

    The model answers d3's built-in prompts at full depth. On its replies d3
    measures what skipping each layer costs, and fits a linear bridge for every
    run of layers that order skips. Then it answers held-out prompts under
    candidate schedules, and the fastest whose replies stay within the budget
    becomes its schedule. The result goes to the user cache, where generate,
    chat, bench, serve and profile-ppl find it by themselves.
    """
    from d3cli.base.errors import UserError
    from d3cli.core.model.loader import load, model_identity
    from d3cli.core.session.front_door import attach_calibration
    from d3cli.core.session.settings import DecodeSettings
    from d3cli.evaluation.calibrate.checkpoint import CalibrationCheckpoint
    from d3cli.evaluation.calibrate.estimate import (
        estimate_from,
        measure_costs,
        parse_duration,
        time_limit_cost,
        within_time,
    )
    from d3cli.evaluation.calibrate.options import CalibrationOptions, check_fits
    from d3cli.evaluation.calibrate.run import calibrate as make_calibration
    from d3cli.evaluation.calibrate.run import choose_only

    if calibration is not None and not schedule_only:
        raise UserError("--calibration names the calibration --schedule-only chooses for; a new calibration goes to "
                        "--output")
    options = CalibrationOptions(prompts=prompts, reply_tokens=reply_tokens, batch_size=batch_size,
                                 profile_texts=profile_texts, ridge=ridge, rank=rank, head=head, tail=tail,
                                 budget=budget, schedule_prompts=schedule_prompts, schedule_tokens=schedule_tokens)
    limit_s = parse_duration(time_limit) if time_limit is not None else None
    loaded = load(model.options())
    check_fits(loaded, options)
    if schedule_only:
        loaded = attach_calibration(loaded, DecodeSettings(calibration=str(calibration) if calibration else None))
    labels = {"corpus": "replies (tokens)", "profile": "layer profile (texts)", "bridges": "bridges (texts)",
              "schedule": "schedule (replies)"}
    costs = measure_costs(loaded, options)
    cost = ""
    if limit_s is not None:
        limited = within_time(costs, options, limit_s, schedule_only)
        cost = time_limit_cost(options, limited)
        if cost:
            render.write_stderr_line(f"d3: calibrate: --time-limit {time_limit}: {cost}")
        options = limited
    estimate = estimate_from(costs, options, schedule_only)
    render.write_stderr_line(f"d3: {render.calibration_estimate_text(loaded.name, estimate)}")
    if not schedule_only:
        made = len(CalibrationCheckpoint(model_identity(loaded), options).batches)
        if made:
            render.write_stderr_line(f"d3: calibrate: resuming: {made} batch{'es' if made > 1 else ''} of replies "
                                     "from an interrupted run are kept")
    stages = render.StageLines(labels) if not sys.stderr.isatty() else None  # a pipe gets a line per stage
    with render.BenchProgress(render.stderr_console()) as progress:
        def on_stage(stage: str, total: int) -> None:
            progress.add(stage, labels[stage], total, 0)
            progress.start(stage)
            if stages is not None:
                stages.start(stage, total, estimate.get(stage))

        def advance(stage: str, amount: int) -> None:
            progress.advance(stage, amount)

        if schedule_only:
            result = choose_only(loaded, options, output, advance, on_stage)
        else:
            result = make_calibration(loaded, options, output, advance, on_stage)
        if stages is not None:
            stages.finish()
    record = {
        "model": loaded.name,
        "calibration": str(result.path),
        "texts": result.texts,
        "tokens": result.tokens,
        "skip_order": "importance",
        "drop_order": result.drop_order,
        "bridged_runs": [list(run) for run in result.runs],
        "rank": rank,
        "bridge_bytes": result.bridge_bytes,
        "seconds": {stage: round(value, 1) for stage, value in result.seconds.items()},
        "schedule": result.schedule,
        "time_limit_s": limit_s,
        "time_limit_cost": cost or None,
    }
    if as_json:
        render.write_json_line(record)
    else:
        render.print_calibration_made(render.stdout_console(), record)
