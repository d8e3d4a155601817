"""`d3 profile-ppl`: the per-position perplexity profile, the layer profile, and calibration of α and the floor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from d3cli.base.errors import UserError, check_at_least
from d3cli.cli import render
from d3cli.cli.options import (
    OUTPUT_PANEL,
    TASK_PANEL,
    DataDirOption,
    ModelArgs,
    ProfileDepthArgs,
    ShotsOption,
    SubtasksOption,
    TaskChatOption,
    flag,
    option,
    parse_alphas,
    parse_list,
    uses_option_groups,
)
from d3cli.core.session.settings import DecodeSettings
from d3cli.evaluation.profile import files as profile_files

PROFILE_PANEL = "Profile"
CALIBRATION_PANEL = "Calibration"


SelfGeneratedOption = flag("--self", "Score the model's own greedy continuations of the task prompts.", TASK_PANEL)
LayersOption = flag("--layers", "Measure the layer profile: block influence and the NLL cost of skipping "
                    "each layer alone at late positions (L extra forwards per text).", PROFILE_PANEL)
JsonOption = flag("--json", "Print everything as one JSON object on stdout (the chart goes to stderr).")
LimitOption = option(int, "Texts to score (per BBH subtask).", TASK_PANEL)
OffsetOption = option(int, "Skip the first N examples (per BBH subtask): score texts a layer profile was not measured"
                           " on.", TASK_PANEL)
PromptTokensOption = option(int, "With --text-file: tokens of each document that form its prompt.", TASK_PANEL)
MaxPositionsOption = option(int, "Score at most this many continuation tokens per text.", TASK_PANEL)
BucketSizeOption = option(int, "Positions per row of the chart.", PROFILE_PANEL)
LateFromOption = option(int, "Positions from here on are 'late' for the layer profile.", PROFILE_PANEL)
SaveProfileOption = option(Optional[Path], "Write the layer profile here (implies --layers), for --skip-order "
                                           "importance --profile FILE.", PROFILE_PANEL, show_default=False)
TargetSpeedupOption = option(Optional[float], "Recommend α and min-layers that reach this decode speedup.",
                                              CALIBRATION_PANEL, show_default=False)
TargetLayerRatioOption = option(Optional[float], "Recommend α and min-layers whose mean layers per token are this "
                                                 "fraction of L.", CALIBRATION_PANEL, show_default=False)
ReplyTokensOption = option(int, "Typical reply length the calibration plans for.", CALIBRATION_PANEL)


@uses_option_groups
def profile_ppl(
    task: Annotated[
        Optional[str], typer.Option("--task", help="Score a task's reference answers after its prompts: gsm8k or "
                                    "bbh (default gsm8k unless --text-file).", rich_help_panel=TASK_PANEL,
                                    show_default=False),
    ] = None,
    text_file: Annotated[
        Optional[Path], typer.Option("--text-file", help="Score documents of this file (blank-line separated), "
                                     "each split after --prompt-tokens; a .jsonl file gives prompt/continuation "
                                     "pairs.", rich_help_panel=TASK_PANEL, show_default=False),
    ] = None,
    self_generated: SelfGeneratedOption = False,
    subtasks: SubtasksOption = None,
    limit: LimitOption = 32,
    offset: OffsetOption = 0,
    shots: ShotsOption = None,
    chat: TaskChatOption = False,
    data_dir: DataDirOption = None,
    prompt_tokens: PromptTokensOption = 64,
    max_positions: MaxPositionsOption = 256,
    model: ModelArgs = ModelArgs(),
    depth: ProfileDepthArgs = ProfileDepthArgs(),
    bucket_size: BucketSizeOption = 16,
    layers: LayersOption = False,
    late_from: LateFromOption = 16,
    save_profile: SaveProfileOption = None,
    target_speedup: TargetSpeedupOption = None,
    target_layer_ratio: TargetLayerRatioOption = None,
    reply_tokens: ReplyTokensOption = 128,
    as_json: JsonOption = False,
    csv_file: Annotated[
        Optional[Path], typer.Option("--csv", help="Write the per-position buckets as CSV to this file.",
                                     rich_help_panel=OUTPUT_PANEL, show_default=False),
    ] = None,
    plot: Annotated[
        Optional[Path], typer.Option("--plot", help="Draw the profile into this PNG (needs pip install "
                                     "'d3cli\\[plot]').", rich_help_panel=OUTPUT_PANEL, show_default=False),
    ] = None,
) -> None:
    """Show how perplexity falls with position after the prompt, what each layer is worth, and which α to use.

    For every continuation token, its NLL at full depth by its position i after the prompt, in buckets with 95%
    intervals and a fitted power law ppl(i) ≈ c + a·(i+1)^(−b); with --alpha the same under D3.
    """
    from d3cli.evaluation.profile.run import Corpus, ProfileOptions, profile  # here: `d3 --help` imports no torch

    if text_file is not None and self_generated:
        raise UserError("--text-file and --self are two different corpora: pick one")
    if text_file is not None and (task is not None or subtasks or shots is not None or chat or offset):
        raise UserError("--task, --subtasks, --offset, --shots and --chat choose task prompts; --text-file brings "
                        "its own text")
    for name, value, least in (("--limit", limit, 1), ("--max-positions", max_positions, 2),
                               ("--bucket-size", bucket_size, 1), ("--reply-tokens", reply_tokens, 2),
                               ("--late-from", late_from, 0), ("--offset", offset, 0)):
        check_at_least(name, value, least)
    if target_speedup is not None and target_layer_ratio is not None:
        raise UserError("give one of --target-speedup and --target-layer-ratio, not both")
    if (target_speedup is not None or target_layer_ratio is not None) and limit < 2:
        raise UserError("calibration needs --limit 2 or more: half the texts calibrate, the other half check")
    alphas = parse_alphas(depth.alpha) if depth.alpha is not None else ()
    settings = DecodeSettings.from_options(**depth.values(alpha=alphas[0] if alphas else 1.0),
                                           max_new_tokens=max_positions, temperature=0.0, top_k=0, top_p=1.0,
                                           seed=None, stop=None)
    if plot is not None:
        profile_files.require_matplotlib()
    options = ProfileOptions(max_positions=max_positions, bucket_size=bucket_size,
                             layers=layers or save_profile is not None, late_from=late_from, save_profile=save_profile,
                             target_speedup=target_speedup, target_layer_ratio=target_layer_ratio,
                             reply_tokens=reply_tokens)
    if text_file is not None:
        corpus = Corpus(str(text_file), text_file=text_file, prompt_tokens=prompt_tokens, limit=limit)
    else:
        from d3cli.evaluation.tasks import get_task, task_examples
        from d3cli.evaluation.tasks.base import TaskOptions

        benchmark = get_task(task or "gsm8k")
        task_options = TaskOptions(shots=shots, chat=chat, subtasks=parse_list(subtasks), limit=limit, offset=offset)
        examples, _ = task_examples(benchmark, task_options, data_dir, on_download=render.print_download)
        corpus = Corpus.of_task(benchmark, examples, self_generated)

    from d3cli.core.session.front_door import open_model

    loaded = open_model(model.options(), settings).loaded
    console = render.stderr_console()
    with render.Spinner(console, "preparing the texts") as spinner:
        result = profile(loaded, corpus, settings, alphas, options, on_status=spinner.update)

    out = console if as_json else render.stdout_console()
    render.print_ppl_profile(out, result)
    if options.layers:
        render.print_layer_profile(out, result)
        if save_profile is not None:
            render.print_info(out, f"layer profile written to {save_profile}")
    if options.calibrate:
        render.print_calibration(out, result["recommendation"])
    if csv_file is not None:
        profile_files.write_csv(csv_file, result["profile"])
    if plot is not None:
        profile_files.write_plot(plot, result)
    if as_json:
        render.write_json_line(result)
