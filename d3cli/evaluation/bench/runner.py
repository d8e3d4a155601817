"""A bench run: its examples encoded, each method decoded over the unfinished ones (a share each in a data-parallel
run) and appended as it finishes, and the summary."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from d3cli.base.errors import UserError
from d3cli.core.decode import engine
from d3cli.core.decode.results import ReplyCollector
from d3cli.core.model.model_facts import context_length, num_decoder_layers
from d3cli.core.session.plan import plan_for
from d3cli.core.session.settings import DecodeSettings, settings_as_options
from d3cli.evaluation import fidelity
from d3cli.evaluation.bench.distributed import World
from d3cli.evaluation.bench.methods import (
    METHOD_KINDS,
    MethodRun,
    bench_alphas,
    default_methods,
    method_runs,
    plan_for_run,
)
from d3cli.evaluation.bench.results_file import (
    ResultsFile,
    prompt_digest,
    rank_file,
)
from d3cli.evaluation.bench.summary import by_subtask, summarize
from d3cli.evaluation.tasks.base import Example, TaskOptions


def encode_examples(loaded, examples: Sequence[Example]) -> dict[str, list[int]]:
    """Every example's prompt as token ids, once for all methods; a prompt too long for the model is a UserError."""
    context = context_length(loaded.model)
    encoded = {}
    for example in examples:
        token_ids = example.prompt_ids(loaded.tokenizer)
        if context is not None and len(token_ids) >= context:
            raise UserError(f"{example.id}'s prompt is {len(token_ids)} tokens, the model's context {context}: "
                            "use fewer --shots")
        encoded[example.id] = token_ids
    return encoded


def run_method(loaded, task, examples: Sequence[Example], prompts: dict[str, list[int]], run: MethodRun, plan,
               batch_size: int, results: ResultsFile, on_example=None, batch_tag: str = "") -> None:
    """Decode every example this method has not finished yet; each result is written the moment its row ends.
    `batch_tag` keeps batch ids of different processes apart (the summary times a batch by its id)."""
    eos = engine.eos_token_ids(loaded.model, loaded.tokenizer)
    done = results.done(run.key, examples)
    todo = [example for example in examples if example.id not in done]
    stop_strings = tuple(task.stop_strings) + plan.stop
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        batch_prompts = [prompts[example.id] for example in batch]
        collector = ReplyCollector(len(batch))
        batch_id = f"{run.key}/{time.time():.6f}{batch_tag}"
        events = engine.stream_decode(loaded, batch_prompts, plan, stop=stop_strings)
        scoring = getattr(task, "scores_replies", False)
        waiting = []  # rows to score at full depth once the batch's decode is over (it holds the model's layers)
        try:
            for event in events:
                collector.add(event)
                if event.finish_reason is None:
                    continue
                example, reply = batch[event.row], collector.replies[event.row]
                answer = task.extract(reply.text, example)
                words = fidelity.reply_tokens(reply, eos)
                record = {
                    "type": "example", "method": run.key, "id": example.id, "subtask": example.subtask,
                    "prompt_sha256": prompt_digest(example), "output": reply.text, "strict": answer.strict,
                    "flexible": answer.flexible, "gold": example.gold,
                    "correct": task.is_correct(answer.strict, example),
                    "correct_flexible": task.is_correct(answer.flexible, example),
                    "tokens": reply.generated_tokens, "layers": reply.layers_per_token,
                    "seconds": round(reply.time_s, 4), "first_token_seconds": round(reply.first_token_s or 0.0, 4),
                    "batch": batch_id, "finish_reason": reply.finish_reason, "token_ids": reply.token_ids,
                    "repetition": round(fidelity.repeated_share(words), 4),
                }
                if scoring:
                    waiting.append((record, prompts[example.id], words))
                    continue
                results.add(record)
                if on_example is not None:
                    on_example(run)
        finally:
            events.close()
        for record, prompt_ids, words in waiting:
            record["nll_full_depth"] = fidelity.full_depth_nll(loaded, prompt_ids, words)
            results.add(record)
            if on_example is not None:
                on_example(run)


def run_identity(task_name: str, model_name: str, options: TaskOptions, settings: DecodeSettings,
                 alphas: Sequence[float], methods: Sequence[str], calibration=None) -> dict:
    """What a results file must agree on to be resumed (methods and alphas may grow)."""
    decode = {key: value for key, value in settings_as_options(settings).items()
              if key not in ("alpha", "chat", "system", "bridges") and not (key == "profile" and value is None)}
    identity = {"task": task_name, "model": model_name, "shots": options.shots, "chat": options.chat,
                "decode": decode, "alphas": list(alphas), "methods": list(methods)}
    if calibration is not None:  # another calibration means other bridges and maybe another skip order
        identity["calibration"] = calibration.label
    return identity


class Progress:
    """What a bench run reports as it goes (the CLI's progress bars; anything with these three methods)."""

    def add(self, key: str, label: str, total: int, done: int) -> None: ...
    def start(self, key: str) -> None: ...
    def advance(self, key: str) -> None: ...


@dataclass
class Benchmark:
    """One `d3 bench` run, checked and ready: its methods, schedules that fit the model, encoded prompts and the
    results read back (with `resume`). `run` decodes what is missing, this process's share of it in a data-parallel
    `world`; `summary` reads the records."""

    loaded: object  # loader.LoadedModel
    task: object  # tasks.base.Task
    examples: Sequence[Example]
    settings: DecodeSettings
    runs: list[MethodRun]
    prompts: dict[str, list[int]]
    results: ResultsFile
    num_layers: int
    world: World = field(default_factory=World)

    @classmethod
    def prepare(cls, loaded, task, examples: Sequence[Example], options: TaskOptions, settings: DecodeSettings,
                alphas: Sequence[float], methods: Sequence[str] | None, path: Path, resume: bool,
                world: World | None = None) -> Benchmark:
        """Every check that can fail before decoding (methods, each schedule against this model, prompt lengths,
        the results file's identity) is made here; nothing is written yet."""
        num_layers = num_decoder_layers(loaded.model)
        alphas = bench_alphas(loaded, settings, alphas)
        chosen = methods or default_methods(plan_for(loaded, settings).schedule)
        runs = method_runs(chosen, alphas)
        for run in runs:  # every schedule must fit this model before anything runs
            if not METHOD_KINDS[run.method].matched:
                plan_for_run(run, loaded, settings)
        prompts = encode_examples(loaded, examples)
        identity = run_identity(task.name, loaded.name, options, settings, alphas, chosen, loaded.calibration)
        results = ResultsFile(path, identity, resume, start=False)
        return cls(loaded, task, examples, settings, runs, prompts, results, num_layers, world or World())

    def unfinished(self, run: MethodRun) -> list[Example]:
        done = self.results.done(run.key, self.examples)
        return [example for example in self.examples if example.id not in done]

    def run(self, batch_size: int, progress: Progress) -> bool:
        """Decode every method's unfinished examples in order; False when Ctrl-C stopped it (the results file keeps
        every finished example either way). In a data-parallel world this process decodes its strided share of each
        method's unfinished examples (the same lists on every process: all read the same files before any wrote),
        the processes exchange each method's records before the next method (baselines are matched to all of
        D3's), and rank 0 merges everything into --output at the end."""
        world = self.world
        shares = {run.key: world.share(self.unfinished(run)) for run in self.runs}
        try:
            if world.parallel:
                self.results.start(rank_file(self.results.path, world.rank, world.size), rank=world.rank,
                                   processes=world.size)
            else:
                self.results.start(self.results.path)
            for run in self.runs:
                if world.parallel:  # this process's share only: about 1/size of the examples
                    progress.add(run.key, run.label, len(shares[run.key]), 0)
                else:
                    progress.add(run.key, run.label, len(self.examples),
                                 len(self.results.done(run.key, self.examples)))
            for run in self.runs:
                d3_records = list(self.results.done(run.matched_d3.key, self.examples).values())
                plan = plan_for_run(run, self.loaded, self.settings, d3_records)
                progress.start(run.key)
                before = len(self.results.records)
                run_method(self.loaded, self.task, shares[run.key], self.prompts, run, plan, batch_size,
                           self.results, on_example=lambda finished: progress.advance(finished.key),
                           batch_tag=f"/rank{world.rank}" if world.parallel else "")
                if world.parallel:
                    everyone = world.all_gather(self.results.records[before:])
                    for rank, records in enumerate(everyone):
                        if rank != world.rank:
                            self.results.extend(records)
        except KeyboardInterrupt:
            return False
        finally:
            self.results.close()
        if world.is_main and (world.parallel or self.results.rank_sources):
            self.results.merge(self.runs, self.examples, world.size)
        return True

    def summary(self) -> dict:
        """The side-by-side summary of what the results file holds."""
        d3_plan = plan_for(self.loaded, self.settings)
        d3_schedule, calibration = d3_plan.schedule, self.loaded.calibration
        summary = {
            "task": self.task.name,
            "model": self.loaded.name,
            "calibration": calibration.label if calibration is not None else None,
            "skip_order": d3_schedule.skip_order,
            "schedule_source": d3_plan.schedule_source,
            "examples": len(self.examples),
            "output": str(self.results.path),
            "methods": summarize(self.results.records, self.runs, self.examples, self.num_layers),
        }
        if self.task.name == "bbh":
            summary["by_subtask"] = by_subtask(self.results.records, self.examples)
        return summary
