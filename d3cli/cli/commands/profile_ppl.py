"""`d3 profile-ppl`: the per-position perplexity profile, the layer profile, and calibration of α and the floor."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from d3cli.evaluation import profile_files
from d3cli.cli import render
from d3cli.core.errors import UserError, check_at_least
from d3cli.cli.options import (
    OUTPUT_PANEL,
    TASK_PANEL,
    DataDirOption,
    ModelArgs,
    ProfileDepthArgs,
    ShotsOption,
    SubtasksOption,
    TaskChatOption,
    parse_alphas,
    parse_list,
    uses_option_groups,
)
from d3cli.core.settings import DecodeSettings

PROFILE_PANEL = "Profile"
CALIBRATION_PANEL = "Calibration"


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
    self_generated: Annotated[
        bool, typer.Option("--self", help="Score the model's own greedy continuations of the task prompts.",
                           rich_help_panel=TASK_PANEL),
    ] = False,
    subtasks: SubtasksOption = None,
    limit: Annotated[
        int, typer.Option(help="Texts to score (per BBH subtask).", rich_help_panel=TASK_PANEL),
    ] = 32,
    offset: Annotated[
        int, typer.Option(help="Skip the first N examples (per BBH subtask): score texts a layer profile was not "
                          "measured on.", rich_help_panel=TASK_PANEL),
    ] = 0,
    shots: ShotsOption = None,
    chat: TaskChatOption = False,
    data_dir: DataDirOption = None,
    prompt_tokens: Annotated[
        int, typer.Option(help="With --text-file: tokens of each document that form its prompt.",
                          rich_help_panel=TASK_PANEL),
    ] = 64,
    max_positions: Annotated[
        int, typer.Option(help="Score at most this many continuation tokens per text.", rich_help_panel=TASK_PANEL),
    ] = 256,
    model: ModelArgs = ModelArgs(),
    depth: ProfileDepthArgs = ProfileDepthArgs(),
    bucket_size: Annotated[
        int, typer.Option(help="Positions per row of the chart.", rich_help_panel=PROFILE_PANEL),
    ] = 16,
    layers: Annotated[
        bool, typer.Option("--layers", help="Measure the layer profile: block influence and the NLL cost of skipping "
                           "each layer alone at late positions (L extra forwards per text).",
                           rich_help_panel=PROFILE_PANEL),
    ] = False,
    late_from: Annotated[
        int, typer.Option(help="Positions from here on are 'late' for the layer profile.",
                          rich_help_panel=PROFILE_PANEL),
    ] = 16,
    save_profile: Annotated[
        Optional[Path], typer.Option(help="Write the layer profile here (implies --layers), for --skip-order "
                                     "importance --profile FILE.", rich_help_panel=PROFILE_PANEL, show_default=False),
    ] = None,
    target_speedup: Annotated[
        Optional[float], typer.Option(help="Recommend α and min-layers that reach this decode speedup.",
                                      rich_help_panel=CALIBRATION_PANEL, show_default=False),
    ] = None,
    target_layer_ratio: Annotated[
        Optional[float], typer.Option(help="Recommend α and min-layers whose mean layers per token are this "
                                      "fraction of L.", rich_help_panel=CALIBRATION_PANEL, show_default=False),
    ] = None,
    reply_tokens: Annotated[
        int, typer.Option(help="Typical reply length the calibration plans for.", rich_help_panel=CALIBRATION_PANEL),
    ] = 128,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print everything as one JSON object on stdout (the chart goes to stderr).",
                           rich_help_panel=OUTPUT_PANEL),
    ] = False,
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
    calibrate = target_speedup is not None or target_layer_ratio is not None
    if calibrate and limit < 2:
        raise UserError("calibration needs --limit 2 or more: half the texts calibrate, the other half check")
    alphas = parse_alphas(depth.alpha) if depth.alpha is not None else ()
    settings = DecodeSettings.from_options(**depth.values(alpha=alphas[0] if alphas else 1.0),
                                           max_new_tokens=max_positions, temperature=0.0, top_k=0, top_p=1.0,
                                           seed=None, stop=None)
    if plot is not None:
        profile_files.require_matplotlib()
    layers = layers or save_profile is not None

    examples, corpus_name, stop_strings = [], str(text_file), ()
    if text_file is None:
        from d3cli.evaluation.tasks import get_task, task_examples
        from d3cli.evaluation.tasks.base import TaskOptions

        benchmark = get_task(task or "gsm8k")
        options = TaskOptions(shots=shots, chat=chat, subtasks=parse_list(subtasks), limit=limit, offset=offset)
        examples, _ = task_examples(benchmark, options, data_dir, on_download=render.print_download)
        corpus_name = f"{benchmark.name} {'own greedy continuations' if self_generated else 'reference answers'}"
        stop_strings = benchmark.stop_strings

    from d3cli.evaluation import corpus, profiling
    from d3cli.core.loader import context_length, load, model_identity, num_decoder_layers

    loaded = load(model.options())
    loaded = settings.with_calibration(loaded)
    num_layers = num_decoder_layers(loaded.model)
    schedules = {f"α={value:g}": dataclasses.replace(settings, alpha=value).schedule_for(num_layers,
                                                                                        loaded.calibration)
                 for value in alphas}
    base_schedule = settings.schedule_for(num_layers, loaded.calibration)
    context = context_length(loaded.model)
    console = render.stderr_console()

    if text_file is not None:
        texts = corpus.file_texts(loaded.tokenizer, text_file, prompt_tokens, max_positions, context, limit)
    elif self_generated:
        with render.Spinner(console, "generating the model's own continuations") as spinner:
            done = iter(range(1, len(examples) + 1))
            texts = corpus.self_texts(loaded, examples, stop_strings, max_positions, context,
                                      on_text=lambda: spinner.update(f"generating continuations: {next(done)}/"
                                                                     f"{len(examples)}"))
    else:
        texts = corpus.reference_texts(loaded.tokenizer, examples, max_positions, context)
    if not texts:
        raise UserError(f"no text to score in {corpus_name}")

    with render.Spinner(console, f"scoring {len(texts)} texts") as spinner:
        done = iter(range(1, len(texts) + 1))
        found = profiling.measure(loaded.model, texts, schedules, num_layers, layer_profile=layers,
                                  late_from=late_from,
                                  on_text=lambda: spinner.update(f"scoring texts: {next(done)}/{len(texts)}"))
    result = {"model": loaded.name, "corpus": corpus_name, "num_layers": num_layers,
              "calibration": loaded.calibration.label if loaded.calibration is not None else None,
              "skip_order": base_schedule.skip_order, "bridges": base_schedule.bridges is not None,
              "profile": profiling.report(found, schedules, bucket_size, max_positions)}
    if layers:
        layer_profile = profiling.layer_profile_of(found, model_identity(loaded), corpus_name, len(texts), late_from)
        result["late_from"] = late_from
        result["layers"] = profiling.layer_rows(layer_profile, base_schedule.head, base_schedule.tail)
        result["importance_ranking"] = layer_profile.importance_ranking()
        if save_profile is not None:
            layer_profile.save(save_profile)
            result["saved_profile"] = str(save_profile)
    if calibrate:
        from d3cli.evaluation.calibration import recommend_and_check

        with render.Spinner(console, "calibrating") as spinner:
            result["recommendation"] = recommend_and_check(loaded.model, texts, base_schedule, reply_tokens,
                                                           target_speedup, target_layer_ratio, spinner.update)

    out = console if as_json else render.stdout_console()
    render.print_ppl_profile(out, result)
    if layers:
        render.print_layer_profile(out, result)
        if save_profile is not None:
            render.print_info(out, f"layer profile written to {save_profile}")
    if calibrate:
        render.print_calibration(out, result["recommendation"])
    if csv_file is not None:
        profile_files.write_csv(csv_file, result["profile"])
    if plot is not None:
        profile_files.write_plot(plot, result)
    if as_json:
        render.write_json_line(result)
