"""`d3 bench`: GSM8K or BBH at full depth, with D3 and with matched-compute baselines, side by side.

The command parses its options into one BenchRequest and hands it to the run of its kind of --task (RUNS): d3's own
tasks, lm-eval tasks, or the speed timings."""

from __future__ import annotations

import dataclasses
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from d3cli.base.errors import UserError, check_at_least
from d3cli.base.launch import launched_size, single_process_launch
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
                   "sections (weight kinds, α = 1, step costs): a few minutes. --task startup: one round, 5 calls.")
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
                                      "scored by lm-eval; needs d3cli[eval]), speed (timings only: α = 1 against "
                                      "the model's own generate, step cost per layer, D3 against its ideal, batches, "
                                      "KV cache, first token), or startup (a new process's first token, cold, warm "
                                      "and through a running d3 serve, and where a warm start goes).",
                                      rich_help_panel=TASK_PANEL)] = "gsm8k",
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

    if quick and task not in ("speed", "startup"):
        raise UserError("--quick applies to --task speed and startup only")
    request = BenchRequest(task, subtasks, limit, shots, chat, data_dir, methods, include_path, model, depth,
                           sampling, parse_alphas(depth.alpha) if depth.alpha is not None else (), batch_size,
                           output, resume, as_json, repeats, quick, launched_size())
    RUNS[request.kind](request)


@dataclass(frozen=True)
class BenchRequest:
    """What `d3 bench` was asked for, parsed; `kind` names its run in RUNS."""

    task: str
    subtasks: str | None
    limit: int | None
    shots: int | None
    chat: bool
    data_dir: Path | None
    methods: str | None
    include_path: Path | None
    model: ModelArgs
    depth: AlphaListDepthArgs
    sampling: AnswerSamplingArgs
    alphas: tuple[float, ...]  # none: the model's own schedule
    batch_size: int
    output: Path | None
    resume: bool
    as_json: bool
    repeats: int
    quick: bool
    launched: int  # processes a launcher (accelerate launch, torchrun) started

    @property
    def kind(self) -> str:
        if self.task in ("speed", "startup"):
            return self.task
        return "lm-eval" if self.task.startswith("lm-eval:") else "task"

    def settings(self, sampling=None) -> DecodeSettings:
        """The decode settings of the first α (or the model's own schedule) and `sampling` (default: as asked)."""
        sampling = self.sampling if sampling is None else sampling
        return DecodeSettings.from_options(**self.depth.values(alpha=self.alphas[0] if self.alphas else None),
                                           **sampling.values())

    def asked_methods(self) -> tuple[str, ...] | None:
        """--methods with full depth first, checked before anything loads; None: the default methods."""
        from d3cli.evaluation.bench import method_runs

        if self.methods is None:
            return None
        asked = tuple(dict.fromkeys(("full", *parse_list(self.methods))))
        method_runs(asked, self.alphas)
        return asked

    def check_sizes(self) -> None:
        if self.limit is not None:
            check_at_least("--limit", self.limit, 1)
        check_at_least("--batch-size", self.batch_size, 1)

    def console(self):
        """Where the table goes: stdout, or stderr when --json puts the JSON on stdout."""
        return render.stderr_console() if self.as_json else render.stdout_console()


def run_speed(request: BenchRequest) -> None:
    """`--task speed`: the timings of one loaded model (evaluation/speed/report.py), in one process."""
    from d3cli.core.session.front_door import open_model
    from d3cli.evaluation.speed.report import measure

    if request.launched > 1:
        raise UserError("--task speed times one process: run it without a launcher (accelerate launch, torchrun)")
    check_at_least("--repeats", request.repeats, 1)
    greedy = dataclasses.replace(request.sampling, temperature=0.0, seed=None)  # the timings decode greedily
    settings = request.settings(greedy)
    model_options = request.model.options()
    loaded = open_model(model_options, settings).loaded
    console = render.stderr_console()
    with render.Spinner(console, "timing") as spinner:
        report = measure(loaded, model_options, settings, request.alphas, request.repeats, on_status=spinner.update,
                         quick=request.quick)
    render.print_speed_report(console if request.as_json else render.stdout_console(), report)
    if request.as_json:
        render.write_json_line(report)


def run_task(request: BenchRequest) -> None:
    """d3's own tasks (gsm8k, bbh, replies): evaluation/bench's Benchmark, data-parallel under a launcher."""
    from d3cli.core.session.front_door import open_model
    from d3cli.evaluation import bench as runner
    from d3cli.evaluation.bench import distributed
    from d3cli.evaluation.tasks import get_task, task_examples
    from d3cli.evaluation.tasks.base import TaskOptions

    asked_methods = request.asked_methods()
    if request.include_path is not None:
        raise UserError("--include-path applies to --task lm-eval:TASK only")
    request.check_sizes()
    settings = request.settings()
    benchmark = get_task(request.task)
    options = TaskOptions(shots=request.shots, chat=request.chat, subtasks=parse_list(request.subtasks),
                          limit=request.limit)
    if single_process_launch():
        render.print_warning("accelerate launch started a single process (without several GPUs it starts more only "
                             "with --multi_gpu, or with --cpu through mpirun): this bench runs in that one")
    world = distributed.current_world()  # a plain run: rank 0 of 1, no process group
    try:
        with world.all_or_none():  # every process makes the same checks; one failing stops all, rank 0 says why
            if world.parallel and request.model.device_map is not None:
                raise UserError("--device-map spreads one model over every device: in a data-parallel run each "
                                "process holds its own model, so leave it out")
            examples, folder = task_examples(benchmark, options, request.data_dir,
                                             on_download=render.print_download if world.is_main else None)
            if not examples:
                raise UserError(f"{request.task} has no examples in {folder}")
            loaded = open_model(request.model.options(), settings).loaded
            path = request.output or Path(f"d3-bench-{request.task}-{model_slug(loaded.name)}.jsonl")
            benchmark_run = runner.Benchmark.prepare(loaded, benchmark, examples, options, settings, request.alphas,
                                                     asked_methods, path, request.resume, world)
        # only rank 0 draws progress bars (of its own share) and prints; the other processes just decode theirs
        bars = render.BenchProgress(render.stderr_console()) if world.is_main else nullcontext(runner.Progress())
        with bars as progress:
            finished = benchmark_run.run(request.batch_size, progress)
        if world.is_main:
            summary = benchmark_run.summary()
            render.print_bench_table(request.console(), summary)
            if request.as_json:
                render.write_json_line(summary)
            if not finished:
                where = f"{path} and its rank files" if world.parallel else path
                render.print_warning(f"interrupted: finished examples are in {where}; add --resume to continue")
        if not finished:
            raise typer.Exit(130)
    finally:
        world.close()


def run_lm_eval(request: BenchRequest) -> None:
    """`--task lm-eval:TASKS`: every method through lm-eval, then d3's side-by-side table from lm-eval's metrics."""
    import importlib.util
    import json

    asked_methods = request.asked_methods()
    if request.launched > 1:
        raise UserError("--task lm-eval: runs in one process; for lm-eval's data-parallel runs use accelerate "
                        "launch ... -m d3cli.evaluation.harness --model d3 (README, lm-evaluation-harness)")
    if request.subtasks or request.resume:
        raise UserError("--subtasks and --resume apply to d3's own tasks; lm-eval tasks are named in --task "
                        "(lm-eval:bbh_cot_fewshot_navigate,...)")
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("--task lm-eval: needs lm-evaluation-harness: pip install 'd3cli[eval]'")
    from d3cli.base.files import write_atomically
    from d3cli.core.session.front_door import open_model
    from d3cli.evaluation.harness import bench as harness
    from d3cli.evaluation.tasks.datasets import data_dir as resolve_data_dir
    from d3cli.evaluation.tasks.datasets import require

    names = harness.parse_task(request.task)
    if request.sampling.temperature or request.sampling.seed is not None:
        raise UserError("--temperature and --seed apply to d3's own tasks: an lm-eval task samples as its "
                        "generation_kwargs say")
    request.check_sizes()
    if request.include_path is not None and not request.include_path.is_dir():
        raise UserError(f"--include-path {request.include_path} is not a folder")
    settings = request.settings()
    folder, downloadable = resolve_data_dir(request.data_dir)
    loaded = open_model(request.model.options(), settings).loaded
    options = harness.HarnessOptions(names, limit=request.limit, shots=request.shots, chat=request.chat,
                                     include_path=request.include_path, batch_size=request.batch_size)

    def download(name: str) -> None:
        render.print_download(name, folder)

    with render.Spinner(render.stderr_console(pinned=True), "lm-eval") as spinner:
        summary = harness.run(loaded, settings, request.alphas, asked_methods, options, folder,
                              require=lambda files: require(folder, files, downloadable, on_download=download),
                              on_status=spinner.update)
    path = request.output or Path(f"d3-bench-lm-eval-{model_slug(loaded.name)}.json")
    summary["output"] = str(path)
    write_atomically(path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    render.print_lm_eval_table(request.console(), summary)
    if request.as_json:
        render.write_json_line(summary)


def run_startup(request: BenchRequest) -> None:
    """`--task startup`: new processes' first token, cold, warm and through a running server, and where a warm
    start goes (evaluation/speed/startup.py)."""
    from d3cli.evaluation.speed import startup

    if request.launched > 1:
        raise UserError("--task startup times new processes: run it without a launcher (accelerate launch, torchrun)")
    check_at_least("--repeats", request.repeats, 1)
    model_options = request.model.options()
    loader_fields = {key: value for key, value in dataclasses.asdict(model_options).items() if key != "lean"}
    rounds, calls = (1, 5) if request.quick else (min(request.repeats, 3), 20)
    with render.Spinner(render.stderr_console(), "timing new processes") as spinner:
        report = startup.measure(model_options.cli_args(), loader_fields, rounds, calls, on_status=spinner.update)
    render.print_startup_report(request.console(), report)
    if request.as_json:
        render.write_json_line(report)


# Each kind of --task and its run: the command parses, picks one here, and that run checks, calls and renders.
RUNS = {"speed": run_speed, "startup": run_startup, "lm-eval": run_lm_eval, "task": run_task}
