"""`d3 calibrate`: fit one model's layer profile and bridges on its own replies; every command then uses them.

A subcommand of its own rather than a mode of profile-ppl: profile-ppl measures a corpus the user brings and
reports; calibrate makes the one artifact the other commands pick up by themselves, from text d3 brings, with a
progress bar and nothing to choose. Parse, call `calibrate.calibrate`, render.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from d3cli.cli import render
from d3cli.cli.options import OUTPUT_PANEL, ModelArgs, uses_option_groups

CALIBRATION_PANEL = "Calibration"


@uses_option_groups
def calibrate(
    model: ModelArgs = ModelArgs(),
    prompts: Annotated[
        int, typer.Option(help="How many of the 128 built-in prompts the model answers (fewer: faster, weaker "
                          "bridges).", rich_help_panel=CALIBRATION_PANEL),
    ] = 64,
    reply_tokens: Annotated[
        int, typer.Option(help="Most tokens of each of the model's replies.", rich_help_panel=CALIBRATION_PANEL),
    ] = 256,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Replies generated at once.", rich_help_panel=CALIBRATION_PANEL),
    ] = 16,
    profile_texts: Annotated[
        int, typer.Option(help="Replies the layer profile (the importance order) is measured on.",
                          rich_help_panel=CALIBRATION_PANEL),
    ] = 16,
    rank: Annotated[
        Optional[int], typer.Option(help="Low-rank bridges of this rank (default: full rank). For large models: a "
                                    "full bridge is hidden² numbers per skipped run.",
                                    rich_help_panel=CALIBRATION_PANEL, show_default=False),
    ] = None,
    ridge: Annotated[
        float, typer.Option(help="Ridge strength, relative to the mean diagonal of XᵀX.",
                            rich_help_panel=CALIBRATION_PANEL),
    ] = 0.1,
    head: Annotated[
        int, typer.Option(help="First layers that are never skipped (bridges are fitted for the others).",
                          rich_help_panel=CALIBRATION_PANEL),
    ] = 2,
    tail: Annotated[
        int, typer.Option(help="Last layers that are never skipped.", rich_help_panel=CALIBRATION_PANEL),
    ] = 2,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Write the calibration here instead of the user cache "
                                     "(then pass it with --calibration).", rich_help_panel=OUTPUT_PANEL,
                                     show_default=False),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print what was made as JSON.", rich_help_panel=OUTPUT_PANEL),
    ] = False,
) -> None:
    """Calibrate a model for D3: its layer order and bridges over skipped layers.

    The model answers d3's built-in prompts at full depth. On its replies d3
    measures what skipping each layer costs, and fits a linear bridge for every
    run of layers that order skips. The result goes to the user cache, where
    generate, chat, bench and profile-ppl find it by themselves.
    """
    from d3cli.evaluation.calibrate import CalibrationOptions, check_fits
    from d3cli.evaluation.calibrate import calibrate as make_calibration
    from d3cli.core.loader import load

    options = CalibrationOptions(prompts=prompts, reply_tokens=reply_tokens, batch_size=batch_size,
                                 profile_texts=profile_texts, ridge=ridge, rank=rank, head=head, tail=tail)
    loaded = load(model.options())
    check_fits(loaded, options)
    labels = {"corpus": "replies (tokens)", "profile": "layer profile (texts)", "bridges": "bridges (texts)"}
    with render.BenchProgress(render.stderr_console()) as progress:
        def on_stage(stage: str, total: int) -> None:
            progress.add(stage, labels[stage], total, 0)
            progress.start(stage)

        result = make_calibration(loaded, options, output, lambda stage, amount: progress.advance(stage, amount),
                                  on_stage)
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
    }
    if as_json:
        render.write_json_line(record)
    else:
        render.print_calibration_made(render.stdout_console(), record)
