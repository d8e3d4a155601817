"""`d3 bench`: GSM8K or BBH at full depth, with D3 and with matched-compute baselines, side by side."""

from __future__ import annotations

import dataclasses
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from d3cli.base.errors import UserError, check_at_least
from d3cli.cli import render
from d3cli.cli.options import (
    OUTPUT_PANEL,
    TASK_PANEL,
    AlphaListDepthArgs,
    AnswerSamplingArgs,
    DataDirOption,
    ModelArgs,
    ShotsOption,
    SubtasksOption,
    TaskChatOption,
    batch_size_option,
    flag,
    option,
    output_option,
    parse_alphas,
    parse_list,
    uses_option_groups,
)
from d3cli.core.session.settings import DecodeSettings

BatchSizeOption = batch_size_option("Examples decoded at once (rows share each step's depth).")
OutputOption = output_option("Per-example results, JSONL (default: "
                             "d3-bench-TASK-MODEL.jsonl here).")
ResumeOption = flag("--resume", "Continue the run in --output: only unfinished examples run.")
JsonOption = flag("--json", "Print the summary as JSON on stdout (the table goes to stderr).")
QuickOption = flag("--quick", "--task speed: 32-token replies, 3 rounds, only the side-by-side "
                   "sections (weight kinds, α = 1, step costs): a few minutes.")
LimitOption = option(Optional[int], "Only the first N examples (per BBH subtask).", TASK_PANEL, show_default=False)
MethodsOption = option(Optional[str], "Which of d3, static, linear and their +bridges forms (d3+bridges...) to run "
                                      "beside full depth. Default: d3, static, linear, and d3+bridges and "
                                      "static+bridges when the model's calibration has bridges.",
                                      TASK_PANEL, show_default=False)
IncludePathOption = option(Optional[Path], "With lm-eval:TASK: a folder of lm-eval task YAMLs (your own tasks, or "
                                           "tasks pointed at local files).", TASK_PANEL, show_default=False)
RepeatsOption = option(int, "--task speed: timed runs per measurement (medians; a warm-up is never timed).",
                            OUTPUT_PANEL)


def model_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace(" (embedded)", "")).strip("-").lower() or "model"


@uses_option_groups
def bench(
    task: Annotated[str, typer.Option("--task", help="gsm8k, bbh, replies (everyday prompts answered freely: each "
                                      "method's repetition and the full-depth model's NLL of its replies against "
                                      "full depth's), lm-eval:TASK[,TASK] (lm-evaluation-harness tasks, "
                                      "scored by lm-eval; needs d3cli[eval]), or speed (timings only: α = 1 against "
                                      "the model's own generate, step cost per layer, D3 against its ideal, batches, "
                                      "KV cache, first token).", rich_help_panel=TASK_PANEL)] = "gsm8k",
    subtasks: SubtasksOption = None,
    limit: LimitOption = None,
    shots: ShotsOption = None,
    chat: TaskChatOption = False,
    data_dir: DataDirOption = None,
    methods: MethodsOption = None,
    include_path: IncludePathOption = None,
    model: ModelArgs = ModelArgs(),
    depth: AlphaListDepthArgs = AlphaListDepthArgs(),
    sampling: AnswerSamplingArgs = AnswerSamplingArgs(),
    batch_size: BatchSizeOption = 1,
    output: OutputOption = None,
    resume: ResumeOption = False,
    as_json: JsonOption = False,
    repeats: RepeatsOption = 5,
    quick: QuickOption = False,
) -> None:
    """Benchmark full depth, D3 and matched-compute baselines on GSM8K, BBH or everyday prompts, side by side.

    Data: gsm8k/{test,train}.jsonl, bbh/tasks/*.json and bbh/cot-prompts/*.txt from the official repositories;
    downloaded into the cache on first use when there is internet.
    """
    from d3cli.evaluation import bench as runner
    from d3cli.evaluation.bench import distributed
    from d3cli.evaluation.tasks import get_task, task_examples
    from d3cli.evaluation.tasks.base import TaskOptions

    alphas = parse_alphas(depth.alpha) if depth.alpha is not None else ()  # none: the model's own schedule
    if quick and task != "speed":
        raise UserError("--quick applies to --task speed only")
    if task == "speed" and distributed.launched_size() > 1:
        raise UserError("--task speed times one process: run it without a launcher (accelerate launch, torchrun)")
    if task == "speed":
        from d3cli.core.session.front_door import open_model
        from d3cli.evaluation.speed.report import measure

        check_at_least("--repeats", repeats, 1)
        greedy = dataclasses.replace(sampling, temperature=0.0, seed=None)  # the timings decode greedily
        settings = DecodeSettings.from_options(**depth.values(alpha=alphas[0] if alphas else None), **greedy.values())
        model_options = model.options()
        loaded = open_model(model_options, settings).loaded
        console = render.stderr_console()
        with render.Spinner(console, "timing") as spinner:
            report = measure(loaded, model_options, settings, alphas, repeats, on_status=spinner.update, quick=quick)
        render.print_speed_report(console if as_json else render.stdout_console(), report)
        if as_json:
            render.write_json_line(report)
        return
    asked_methods = tuple(dict.fromkeys(("full", *parse_list(methods)))) if methods is not None else None
    if asked_methods is not None:
        runner.method_runs(asked_methods, alphas)  # a bad --methods fails before anything loads
    if task.startswith("lm-eval:"):
        if distributed.launched_size() > 1:
            raise UserError("--task lm-eval: runs in one process; for lm-eval's data-parallel runs use accelerate "
                            "launch ... -m d3cli.evaluation.harness --model d3 (README, lm-evaluation-harness)")
        if subtasks or resume:
            raise UserError("--subtasks and --resume apply to d3's own tasks; lm-eval tasks are named in --task "
                            "(lm-eval:bbh_cot_fewshot_navigate,...)")
        run_lm_eval(task, model, depth, sampling, alphas, asked_methods, limit, shots, chat, data_dir, include_path,
                    batch_size, output, as_json)
        return
    if include_path is not None:
        raise UserError("--include-path applies to --task lm-eval:TASK only")
    if limit is not None:
        check_at_least("--limit", limit, 1)
    check_at_least("--batch-size", batch_size, 1)
    settings = DecodeSettings.from_options(**depth.values(alpha=alphas[0] if alphas else None), **sampling.values())
    benchmark = get_task(task)
    options = TaskOptions(shots=shots, chat=chat, subtasks=parse_list(subtasks), limit=limit)
    if distributed.single_process_launch():
        render.print_warning("accelerate launch started a single process (without several GPUs it starts more only "
                             "with --multi_gpu, or with --cpu through mpirun): this bench runs in that one")
    world = distributed.current_world()  # a plain run: rank 0 of 1, no process group
    try:
        with world.all_or_none():  # every process makes the same checks; one failing stops all, rank 0 says why
            if world.parallel and model.device_map is not None:
                raise UserError("--device-map spreads one model over every device: in a data-parallel run each "
                                "process holds its own model, so leave it out")
            examples, folder = task_examples(benchmark, options, data_dir,
                                             on_download=render.print_download if world.is_main else None)
            if not examples:
                raise UserError(f"{task} has no examples in {folder}")

            from d3cli.core.session.front_door import open_model

            loaded = open_model(model.options(), settings).loaded
            path = output or Path(f"d3-bench-{task}-{model_slug(loaded.name)}.jsonl")
            benchmark_run = runner.Benchmark.prepare(loaded, benchmark, examples, options, settings, alphas,
                                                     asked_methods, path, resume, world)
        # only rank 0 draws progress bars (of its own share) and prints; the other processes just decode theirs
        bars = render.BenchProgress(render.stderr_console()) if world.is_main else nullcontext(runner.Progress())
        with bars as progress:
            finished = benchmark_run.run(batch_size, progress)
        if world.is_main:
            summary = benchmark_run.summary()
            console = render.stderr_console() if as_json else render.stdout_console()
            render.print_bench_table(console, summary)
            if as_json:
                render.write_json_line(summary)
            if not finished:
                where = f"{path} and its rank files" if world.parallel else path
                render.print_warning(f"interrupted: finished examples are in {where}; add --resume to continue")
        if not finished:
            raise typer.Exit(130)
    finally:
        world.close()


def run_lm_eval(task, model, depth, sampling, alphas, methods, limit, shots, chat, data_dir, include_path, batch_size,
                output, as_json) -> None:
    """`--task lm-eval:TASKS`: every method through lm-eval, then d3's side-by-side table from lm-eval's metrics."""
    import importlib.util
    import json

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("--task lm-eval: needs lm-evaluation-harness: pip install 'd3cli[eval]'")
    from d3cli.base.files import write_atomically
    from d3cli.core.session.front_door import open_model
    from d3cli.evaluation.harness import bench as harness
    from d3cli.evaluation.tasks.datasets import data_dir as resolve_data_dir
    from d3cli.evaluation.tasks.datasets import require

    names = harness.parse_task(task)
    if sampling.temperature or sampling.seed is not None:
        raise UserError("--temperature and --seed apply to d3's own tasks: an lm-eval task samples as its "
                        "generation_kwargs say")
    if limit is not None:
        check_at_least("--limit", limit, 1)
    check_at_least("--batch-size", batch_size, 1)
    if include_path is not None and not include_path.is_dir():
        raise UserError(f"--include-path {include_path} is not a folder")
    settings = DecodeSettings.from_options(**depth.values(alpha=alphas[0] if alphas else None), **sampling.values())
    folder, downloadable = resolve_data_dir(data_dir)
    loaded = open_model(model.options(), settings).loaded
    options = harness.HarnessOptions(names, limit=limit, shots=shots, chat=chat, include_path=include_path,
                                     batch_size=batch_size)
    with render.Spinner(render.stderr_console(pinned=True), "lm-eval") as spinner:
        summary = harness.run(loaded, settings, alphas, methods, options, folder,
                              require=lambda files: require(folder, files, downloadable,
                                                            on_download=lambda name: render.print_download(name,
                                                                                                           folder)),
                              on_status=spinner.update)
    path = output or Path(f"d3-bench-lm-eval-{model_slug(loaded.name)}.json")
    summary["output"] = str(path)
    write_atomically(path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    console = render.stderr_console() if as_json else render.stdout_console()
    render.print_lm_eval_table(console, summary)
    if as_json:
        render.write_json_line(summary)
