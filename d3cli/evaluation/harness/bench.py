"""`d3 bench --task lm-eval:TASK[,TASK]`: lm-eval's tasks at full depth, with D3 and with the matched baselines, side
by side from lm-eval's own metrics.

Each method is one `lm_eval.simple_evaluate` run of the model `d3` with that method's schedule, on the same
documents; static and linear are matched to the mean depth of the D3 run with their α (over every token it
generated or scored). GSM8K and BBH tasks read d3's data folder (local_tasks.py); others come from lm-eval (the hub,
or `--include-path` YAMLs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from d3cli.base.errors import UserError
from d3cli.core.session.settings import DecodeSettings
from d3cli.evaluation import bench as d3_bench

Status = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class HarnessOptions:
    tasks: tuple[str, ...]
    limit: int | None = None  # documents per task
    shots: int | None = None  # None: each task's own num_fewshot
    chat: bool = False  # lm-eval's --apply_chat_template
    include_path: Path | None = None  # a folder of task YAMLs
    batch_size: int = 1


def parse_task(task: str) -> tuple[str, ...]:
    """`lm-eval:gsm8k_cot,bbh_mc_navigate` -> its task names."""
    names = tuple(part.strip() for part in task.partition(":")[2].split(",") if part.strip())
    if not names:
        raise UserError("--task lm-eval: needs task names, like --task lm-eval:gsm8k_cot")
    return names


def run(loaded, settings: DecodeSettings, alphas: Sequence[float], methods: Sequence[str] | None,
        options: HarnessOptions, folder: Path | None, require=None, on_status: Status = lambda message: None) -> dict:
    """Every method on the tasks; the summary (rows of lm-eval metrics, their change from full depth, agreement of
    the filtered answers with full depth's, mean depth, time)."""
    import lm_eval

    from d3cli.core.model.model_facts import num_decoder_layers
    from d3cli.evaluation.harness.local_tasks import task_list, task_manager_for
    from d3cli.evaluation.harness.model import D3LM

    task_manager = task_manager_for(str(options.include_path) if options.include_path else None)
    tasks = task_list(options.tasks, task_manager, folder, require)
    from d3cli.core.session.plan import plan_for

    num_layers = num_decoder_layers(loaded.model)
    d3_plan = plan_for(loaded, settings)
    chosen = methods or d3_bench.default_methods(d3_plan.schedule)
    runs = d3_bench.method_runs(chosen, d3_bench.bench_alphas(loaded, settings, alphas))
    d3_records: dict[str, list[dict]] = {}  # per D3 run: each request's tokens and layers
    rows, full_samples = [], None
    for run_ in runs:
        plan = d3_bench.plan_for_run(run_, loaded, settings, d3_records.get(run_.matched_d3.key, ()))
        on_status(f"lm-eval: {run_.label}")
        lm = D3LM(loaded=loaded, plan=plan, batch_size=options.batch_size, max_gen_toks=settings.max_new_tokens)
        started = time.perf_counter()
        try:
            with _quiet_lm_eval():
                output = lm_eval.simple_evaluate(
                    model=lm, tasks=list(tasks), num_fewshot=options.shots, limit=options.limit,
                    task_manager=task_manager, log_samples=True, bootstrap_iters=0,
                    apply_chat_template=options.chat, fewshot_as_multiturn=options.chat, verbosity="ERROR")
        except (KeyError, ValueError, FileNotFoundError) as error:
            raise UserError(f"lm-eval could not run {', '.join(options.tasks)}: {error}") from None
        seconds = time.perf_counter() - started
        if run_.method == "d3":
            d3_records[run_.key] = lm.records
        samples = {task: {sample["doc_id"]: _answer(output["configs"][task]["output_type"],
                                                    sample["filtered_resps"])
                          for sample in task_samples}
                   for task, task_samples in output["samples"].items()}
        if run_.method == "full":
            full_samples = samples
        rows.append(_row(run_, output, samples, full_samples, lm.records, seconds, num_layers))
    _add_deltas(rows)
    return {
        "task": "lm-eval:" + ",".join(options.tasks),
        "model": loaded.name,
        "calibration": loaded.calibration.label if loaded.calibration is not None else None,
        "skip_order": d3_plan.schedule.skip_order,
        "schedule_source": d3_plan.schedule_source,
        "tasks": sorted(rows[0]["metrics"]) if rows else [],
        "documents": rows[0]["documents"] if rows else {},
        "methods": rows,
    }


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval as a library under d3's own progress line (which holds the real stderr): lm-eval's progress bars and
    log lines are dropped (its failures still arrive as exceptions), and it makes no environment report (it runs
    `git describe`, which prints "fatal: not a git repository" outside a repository, and torch's collect_env, a
    second per run). D3_DEBUG=1 keeps all of it."""
    if os.environ.get("D3_DEBUG"):
        yield
        return
    import io

    import lm_eval.evaluator

    saved = (sys.stderr, lm_eval.evaluator.get_git_commit_hash, lm_eval.evaluator.add_env_info)
    sys.stderr = io.StringIO()
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    lm_eval.evaluator.add_env_info = lambda storage: None
    levels = {name: logging.getLogger(name).level for name in ("lm_eval", "lm-eval", "datasets", "evaluate")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        sys.stderr = saved[0]
        lm_eval.evaluator.get_git_commit_hash, lm_eval.evaluator.add_env_info = saved[1], saved[2]
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _answer(output_type: str, filtered: list):
    """What agreement with full depth compares: the filtered answer of a generation, the chosen option of a
    multiple-choice question; None for a score alone (a rolling log-likelihood), which has no answer to agree on."""
    if output_type == "multiple_choice":
        return max(range(len(filtered)), key=lambda index: float(filtered[index][0]))
    if output_type == "generate_until":
        return filtered
    return None


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's results per task without aliases and standard errors: {task: {"metric,filter": value}}."""
    return {task: {name: value for name, value in values.items()
                   if "," in name and "_stderr" not in name and isinstance(value, (int, float))}
            for task, values in results.items()}


def _row(run_, output: dict, samples: dict, full_samples: dict | None, records: list[dict], seconds: float,
         num_layers: int) -> dict:
    tokens = sum(record["tokens"] for record in records)
    mean_layers = sum(sum(record["layers"]) for record in records) / tokens if tokens else 0.0
    agreement = None
    if full_samples is not None:
        agreement = {}
        for task, answers in samples.items():
            shared = [doc for doc in answers if doc in full_samples.get(task, {}) and answers[doc] is not None]
            agreement[task] = (round(sum(answers[doc] == full_samples[task][doc] for doc in shared) / len(shared), 4)
                               if shared else None)
    return {
        "name": run_.name, "method": run_.method, "bridges": run_.bridged, "alpha": run_.alpha, "label": run_.label,
        "metrics": _metrics(output["results"]),
        "documents": {task: len(answers) for task, answers in samples.items()},
        "agreement": agreement,
        "mean_layers": round(mean_layers, 3),
        "layer_ratio": round(mean_layers / num_layers, 4) if num_layers else None,
        "tokens": tokens,
        "seconds": round(seconds, 2),
    }


def _add_deltas(rows: list[dict]) -> None:
    full = next((row for row in rows if row["method"] == "full"), None)
    for row in rows:
        row["delta"] = None if full is None else {
            task: {name: round(value - full["metrics"][task][name], 4) for name, value in values.items()
                   if name in full["metrics"].get(task, {})}
            for task, values in row["metrics"].items()}
        row["time_ratio"] = (round(full["seconds"] / row["seconds"], 3)
                             if full is not None and row["seconds"] else None)
