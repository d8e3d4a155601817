"""`d3 bench`: GSM8K or BBH at full depth, with D3 and with matched-compute baselines, side by side."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from d3cli.cli import render
from d3cli.core.errors import UserError
from d3cli.cli.options import (
    TASK_PANEL,
    parse_alphas,
    parse_list,
    DataDirOption,
    ShotsOption,
    SubtasksOption,
    TaskChatOption,
    OUTPUT_PANEL,
    DeviceMapOption,
    DeviceOption,
    DTypeOption,
    HeadOption,
    MinLayersOption,
    ModelOption,
    SeedOption,
    ProfileOption,
    CalibrationOption,
    BridgesOption,
    SkipOrderOption,
    TailOption,
    TemperatureOption,
    TrustRemoteCodeOption,
    WarmupOption,
)
from d3cli.core.schedule import DEFAULT_ALPHA, DEFAULT_HEAD, DEFAULT_MIN_LAYERS, DEFAULT_SKIP_ORDER, DEFAULT_TAIL, \
    DEFAULT_WARMUP
from d3cli.core.settings import DecodeSettings

BENCH_MAX_NEW_TOKENS = 256


def model_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace(" (embedded)", "")).strip("-").lower() or "model"


def bench(
    task: Annotated[str, typer.Option("--task", help="gsm8k, bbh, or speed (timings only: α = 1 against the model's "
                                      "own generate, step cost per layer, D3 against its ideal, batches, KV cache, "
                                      "first token).", rich_help_panel=TASK_PANEL)] = "gsm8k",
    subtasks: SubtasksOption = None,
    limit: Annotated[
        Optional[int], typer.Option(help="Only the first N examples (per BBH subtask).", rich_help_panel=TASK_PANEL,
                                    show_default=False),
    ] = None,
    shots: ShotsOption = None,
    chat: TaskChatOption = False,
    data_dir: DataDirOption = None,
    methods: Annotated[
        Optional[str], typer.Option(help="Which of d3, static, linear and their +bridges forms (d3+bridges...) to run "
                                    "beside full depth. Default: d3, static, linear, and d3+bridges and "
                                    "static+bridges when the model's calibration has bridges.",
                                    rich_help_panel=TASK_PANEL, show_default=False),
    ] = None,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: DTypeOption = "auto",
    device_map: DeviceMapOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    alpha: Annotated[
        str, typer.Option("--alpha", "-a", help="D3 decay rates, comma-separated: one D3 run (and its matched "
                          "baselines) each.", rich_help_panel="Depth decay"),
    ] = str(DEFAULT_ALPHA),
    min_layers: MinLayersOption = DEFAULT_MIN_LAYERS,
    warmup: WarmupOption = DEFAULT_WARMUP,
    head: HeadOption = DEFAULT_HEAD,
    tail: TailOption = DEFAULT_TAIL,
    skip_order: SkipOrderOption = DEFAULT_SKIP_ORDER,
    profile: ProfileOption = None,
    calibration: CalibrationOption = None,
    bridges: BridgesOption = True,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", help="Most tokens per answer.",
                          rich_help_panel="Sampling and length"),
    ] = BENCH_MAX_NEW_TOKENS,
    temperature: TemperatureOption = 0.0,
    seed: SeedOption = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Examples decoded at once (rows share each step's depth).",
                          rich_help_panel=OUTPUT_PANEL),
    ] = 1,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Per-example results, JSONL (default: "
                                     "d3-bench-TASK-MODEL.jsonl here).", rich_help_panel=OUTPUT_PANEL,
                                     show_default=False),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --output: only unfinished examples run.",
                           rich_help_panel=OUTPUT_PANEL),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON on stdout (the table goes to stderr).",
                           rich_help_panel=OUTPUT_PANEL),
    ] = False,
    repeats: Annotated[
        int, typer.Option(help="--task speed: timed runs per measurement (medians; a warm-up is never timed).",
                          rich_help_panel=OUTPUT_PANEL),
    ] = 5,
) -> None:
    """Benchmark full depth, D3 and matched-compute baselines on GSM8K or BBH, side by side.

    Data: gsm8k/{test,train}.jsonl, bbh/tasks/*.json and bbh/cot-prompts/*.txt from the official repositories;
    downloaded into the cache on first use when there is internet.
    """
    from d3cli.evaluation import bench as runner
    from d3cli.evaluation.datasets import data_dir as resolve_data_dir
    from d3cli.evaluation.datasets import require
    from d3cli.evaluation.tasks import get_task
    from d3cli.evaluation.tasks.base import TaskOptions

    alphas = parse_alphas(alpha)
    if task == "speed":
        from d3cli.cli.commands.bench_speed import run_speed

        settings = DecodeSettings.from_options(
            alpha=alphas[0], min_layers=min_layers, warmup=warmup, head=head, tail=tail, skip_order=skip_order,
            profile=profile, calibration=calibration, bridges=bridges, max_new_tokens=max_new_tokens,
            temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=None,
        )
        from d3cli.core.loader import ModelOptions

        run_speed(ModelOptions(model, device, dtype, device_map, trust_remote_code), settings, alphas, repeats, as_json)
        return
    asked_methods = tuple(dict.fromkeys(("full", *parse_list(methods)))) if methods is not None else None
    if asked_methods is not None:
        runner.method_runs(asked_methods, alphas)  # a bad --methods fails before anything loads
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, not {limit}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    settings = DecodeSettings.from_options(
        alpha=alphas[0], min_layers=min_layers, warmup=warmup, head=head, tail=tail, skip_order=skip_order,
        profile=profile, calibration=calibration, bridges=bridges,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0, seed=seed, stop=None,
    )
    benchmark = get_task(task)
    options = TaskOptions(shots=shots, chat=chat, subtasks=parse_list(subtasks), limit=limit)
    folder, downloadable = resolve_data_dir(data_dir)
    require(folder, benchmark.files(options), downloadable,
            on_download=lambda name: render.print_warning(f"downloading {name} into {folder}"))
    examples = benchmark.examples(folder, options)
    if not examples:
        raise UserError(f"{task} has no examples in {folder}")

    from d3cli.core.loader import ModelOptions, load, num_decoder_layers

    loaded = load(ModelOptions(model, device, dtype, device_map, trust_remote_code))
    loaded = settings.with_calibration(loaded)
    num_layers = num_decoder_layers(loaded.model)
    chosen_methods = asked_methods or runner.default_methods(settings.schedule_for(num_layers, loaded.calibration))
    runs = runner.method_runs(chosen_methods, alphas)
    for run in runs:  # every schedule must fit this model before anything runs
        if run.method in ("full", "d3"):
            runner.schedule_for(run, settings, num_layers, None, examples, loaded.calibration)
    prompts = runner.encode_examples(loaded, examples)
    path = output or Path(f"d3-bench-{task}-{model_slug(loaded.name)}.jsonl")
    identity = runner.run_identity(task, loaded.name, options, settings, alphas, chosen_methods, loaded.calibration)
    results = runner.ResultsFile(path, identity, resume)
    interrupted = False
    try:
        with render.BenchProgress(render.stderr_console()) as progress:
            for run in runs:
                progress.add(run.key, run.label, len(examples), len(results.done(run.key, examples)))
            for run in runs:
                schedule = runner.schedule_for(run, settings, num_layers, results, examples, loaded.calibration)
                progress.start(run.key)
                runner.run_method(loaded, benchmark, examples, prompts, run, schedule, settings, batch_size, results,
                                  on_example=lambda finished: progress.advance(finished.key))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        results.close()
    d3_schedule = settings.schedule_for(num_layers, loaded.calibration)
    summary = {
        "task": task,
        "model": loaded.name,
        "calibration": loaded.calibration.label if loaded.calibration is not None else None,
        "skip_order": d3_schedule.skip_order,
        "examples": len(examples),
        "output": str(path),
        "methods": runner.summarize(results.records, runs, examples, num_layers),
    }
    if task == "bbh":
        summary["by_subtask"] = runner.by_subtask(results.records, examples)
    console = render.stderr_console() if as_json else render.stdout_console()
    render.print_bench_table(console, summary)
    if as_json:
        render.write_json_line(summary)
    if interrupted:
        render.print_warning(f"interrupted: finished examples are in {path}; add --resume to continue")
        raise typer.Exit(130)
