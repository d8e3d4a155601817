"""`d3 bench` runs: full depth against D3 and matched-compute baselines, on the same examples, resumable.

Methods, in the order they run: `full` (every layer, the reference), `d3` at each α, then for each α the baselines
matched to that D3 run's mean depth over its generated tokens: `static` (one depth for every token after the first,
the same skip order) and `linear` (SkipDecode-style: depth falls linearly with position). Each of d3, static and
linear also comes as `METHOD+bridges`: the same schedule with the model's calibrated bridges standing in for the
skipped runs (the plain methods skip them); a bridged baseline is matched to the bridged D3 run.

Every finished example is appended to a JSONL file at once (flushed and fsynced); `--resume` reads it back and runs
only what is missing, and the summary is computed from that file alone, so an interrupted-and-resumed run and an
uninterrupted one summarize the same records.

Data-parallel (`accelerate launch`): each process decodes a strided share of each method's unfinished examples and
appends to its own rank file, `OUTPUT.rank-R-of-W`; after each method the processes exchange that method's records
(a baseline is matched to every process's D3 records), and at the end rank 0 writes every record into OUTPUT in the
order one process would have (method by method, example by example) and removes the rank files. `--resume` reads
OUTPUT and any rank files, whatever the number of processes that wrote them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from d3cli import __version__
from d3cli.base.errors import UserError
from d3cli.base.files import write_atomically
from d3cli.core.decode.schedule import DecaySchedule, LinearSchedule, StaticSchedule
from d3cli.core.session.settings import DecodeSettings, settings_as_options
from d3cli.evaluation.distributed import World
from d3cli.evaluation.tasks.base import Example, TaskOptions

BRIDGED = "+bridges"


@dataclass(frozen=True)
class MethodKind:
    """A kind of schedule `d3 bench` runs: its name, and its schedule made from the D3 schedule it goes with; a
    `matched` kind is a baseline whose schedule is fitted to the D3 run's mean depth (its finished records)."""

    name: str
    matched: bool
    schedule: object  # (d3 schedule, d3 records) -> schedule; None for full depth (the plan's own)
    bridgeable: bool = True  # comes as NAME+bridges too


def _d3_itself(d3_schedule: DecaySchedule, records: Sequence[dict]) -> DecaySchedule:
    return d3_schedule


METHOD_KINDS: dict[str, MethodKind] = {}  # filled below, once the matching functions exist
METHODS: tuple[str, ...] = ()
DEFAULT_METHODS = ("full", "d3", f"d3{BRIDGED}", "static", f"static{BRIDGED}", "linear")


@dataclass(frozen=True)
class MethodRun:
    method: str  # full, d3, static, linear
    alpha: float | None  # the D3 α this run is, or is matched to
    bridged: bool = False  # the calibration's bridges stand in for skipped runs

    @property
    def name(self) -> str:
        return f"{self.method}{BRIDGED}" if self.bridged else self.method

    @property
    def key(self) -> str:
        return self.name if self.alpha is None else f"{self.name}@{self.alpha:g}"

    @property
    def matched_d3(self) -> MethodRun:
        """The D3 run a baseline is matched to (itself for a D3 run)."""
        return MethodRun("d3", self.alpha, self.bridged)

    @property
    def label(self) -> str:
        if self.method == "full":
            return "full"
        return f"{self.name} α={self.alpha:g}"  # a baseline's α: the D3 run whose mean depth it matches


def default_methods(d3_schedule: DecaySchedule) -> tuple[str, ...]:
    """What `d3 bench` runs when --methods is not given: the bridged methods only when there are bridges."""
    if d3_schedule.bridge_maps is None:
        return tuple(method for method in DEFAULT_METHODS if not method.endswith(BRIDGED))
    return DEFAULT_METHODS


def method_runs(methods: Sequence[str], alphas: Sequence[float]) -> list[MethodRun]:
    """`full` first, then every D3 run (plain, then bridged), then the baselines matched to each D3 run. An α of 1
    is full depth itself (no layer skipped, no bridge applied): it adds no run beside `full`."""
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r} (choose from: {', '.join(METHODS)})")
    matched_kinds = [kind.name for kind in METHOD_KINDS.values() if kind.matched]
    for bridged in ("", BRIDGED):
        baselines = [f"{name}{bridged}" for name in matched_kinds if f"{name}{bridged}" in methods]
        if baselines and f"d3{bridged}" not in methods:
            raise UserError(f"{' and '.join(baselines)} {'is' if len(baselines) == 1 else 'are'} matched to a "
                            f"d3{bridged} run: add d3{bridged} to --methods")
    def wanted(method: str, alpha: float) -> list[MethodRun]:
        return [MethodRun(method, alpha, bridged) for bridged in (False, True)
                if f"{method}{BRIDGED if bridged else ''}" in methods]

    runs = [MethodRun("full", None)]
    skipping = [alpha for alpha in alphas if alpha < 1.0]
    runs += [run for alpha in skipping for run in wanted("d3", alpha)]
    runs += [run for alpha in skipping for method in matched_kinds for run in wanted(method, alpha)]
    return runs


def prompt_digest(example: Example) -> str:
    return hashlib.sha256(f"{example.chat}\n{example.prompt}".encode()).hexdigest()[:16]


def rank_file(path: Path, rank: int, size: int) -> Path:
    """The file process `rank` of `size` appends to in a data-parallel run with --output `path`."""
    return path.with_name(f"{path.name}.rank-{rank}-of-{size}")


def rank_files(path: Path) -> list[Path]:
    """The rank files beside `path` (left by a running, killed or interrupted data-parallel run), by size and rank."""
    pattern = re.compile(re.escape(path.name) + r"\.rank-(\d+)-of-(\d+)")
    found = []
    if path.parent.is_dir():
        for candidate in path.parent.iterdir():
            match = pattern.fullmatch(candidate.name)
            if match and candidate.is_file():
                found.append(((int(match[2]), int(match[1])), candidate))
    return [candidate for _, candidate in sorted(found)]


def record_key(record: dict) -> tuple:
    return record["method"], record["id"], record.get("prompt_sha256")


class ResultsFile:
    """The JSONL file of a bench: a "run" line per session, then one "example" line per finished example.

    Reading takes OUTPUT and the rank files of a data-parallel run beside it; appending goes to one file, the
    journal (OUTPUT itself, or this process's rank file). `start=False` only reads, so that every process of a
    data-parallel run has read before any of them writes."""

    def __init__(self, path: Path, identity: dict, resume: bool, start: bool = True):
        self.path = path
        self.identity = identity
        self.records: list[dict] = []
        self.run_lines: list[dict] = []
        self.handle = None
        self.session: dict | None = None
        self.rank_sources = rank_files(path)
        sources = ([path] if path.exists() else []) + self.rank_sources
        if sources and not resume:
            what = "already holds results" if sources[0] == path else "holds results of a data-parallel run"
            raise UserError(f"{sources[0]} {what}: add --resume to continue that run, or pick another --output")
        if not sources and resume:
            raise UserError(f"nothing to resume: {path} does not exist")
        seen: set[tuple] = set()
        for source in sources:
            self._read(source, identity, seen)
        if start:
            self.start(path)

    def _read(self, source: Path, identity: dict, seen: set[tuple]) -> None:
        lines = source.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # the last line of a killed run may be cut short
                    break
                raise UserError(f"{source}:{number}: not a d3 bench record") from None
            if record.get("type") == "run":
                mismatch = [key for key in identity if key not in ("methods", "alphas") and
                            record.get(key) != identity[key]]
                if mismatch:
                    raise UserError(f"{source} is a run with other settings ({', '.join(mismatch)} differ): "
                                    "resume it with the same options, or pick another --output")
                self.run_lines.append(record)
            elif record.get("type") == "example" and record_key(record) not in seen:
                seen.add(record_key(record))  # a record in OUTPUT and in a rank file: a merge cut short
                self.records.append(record)

    def start(self, journal: Path, **run_fields) -> None:
        """Append from now on to `journal`, beginning with this session's "run" line."""
        journal.parent.mkdir(parents=True, exist_ok=True)
        if journal.exists():
            with open(journal, "rb+") as handle:  # drop a cut-short last line so the file stays valid JSONL
                content = handle.read()
                if content and not content.endswith(b"\n"):
                    handle.truncate(content.rfind(b"\n") + 1)
        self.handle = open(journal, "a", encoding="utf-8")
        self.session = {"type": "run", "d3": __version__, "started": time.time(), **self.identity, **run_fields}
        self._append(self.session)

    def _append(self, record: dict) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def add(self, record: dict) -> None:
        self._append(record)
        self.records.append(record)

    def extend(self, records: Sequence[dict]) -> None:
        """Records another process wrote (to its own rank file): known here, not written again."""
        self.records.extend(records)

    def done(self, key: str, examples: Sequence[Example]) -> dict[str, dict]:
        """This method's finished records of these examples (with the same prompt), by example id."""
        wanted = {example.id: prompt_digest(example) for example in examples}
        return {record["id"]: record for record in self.records
                if record["method"] == key and wanted.get(record["id"]) == record["prompt_sha256"]}

    def merge(self, runs: Sequence[MethodRun], examples: Sequence[Example], size: int = 1) -> None:
        """Write every record into OUTPUT, in one process's order (`merged_order`), after every "run" line read and
        this session's; then remove the rank files read and those of this session's `size` processes."""
        session = {key: value for key, value in (self.session or {}).items() if key != "rank"}
        self.records = merged_order(self.records, runs, examples)
        lines = [*self.run_lines, *([session] if session else []), *self.records]
        write_atomically(self.path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
        stale = {*self.rank_sources, *(rank_file(self.path, rank, size) for rank in range(size) if size > 1)}
        for path in sorted(stale):
            path.unlink(missing_ok=True)
        self.rank_sources = []

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def merged_order(records: Sequence[dict], runs: Sequence[MethodRun], examples: Sequence[Example]) -> list[dict]:
    """Records of these runs and examples method by method in run order, each in example order (what one process
    with --batch-size 1 writes); other records (another --limit, α or method of an earlier session) after them, as
    they came. One record per (method, example, prompt)."""
    run_index = {run.key: index for index, run in enumerate(runs)}
    example_index = {example.id: (index, prompt_digest(example)) for index, example in enumerate(examples)}
    unique, seen = [], set()
    for record in records:
        if record_key(record) not in seen:
            seen.add(record_key(record))
            unique.append(record)

    def position(numbered: tuple[int, dict]) -> tuple:
        arrival, record = numbered
        method = run_index.get(record["method"])
        example = example_index.get(record["id"])
        if method is not None and example is not None and example[1] == record.get("prompt_sha256"):
            return 0, method, example[0]
        return 1, arrival, 0

    return [record for _, record in sorted(enumerate(unique), key=position)]


def matched_static(d3_schedule: DecaySchedule, records: Sequence[dict]) -> StaticSchedule:
    """The one depth for tokens after the first whose mean over the D3 run's token counts is closest to D3's."""
    tokens = sum(record["tokens"] for record in records)
    target = sum(sum(record["layers"]) for record in records) / tokens
    examples = len(records)
    if tokens == examples:  # one-token replies: only the prefill's full depth
        return StaticSchedule.like(d3_schedule, d3_schedule.num_layers)
    depth = round((target * tokens - examples * d3_schedule.num_layers) / (tokens - examples))
    return StaticSchedule.like(d3_schedule, depth)


def matched_linear(d3_schedule: DecaySchedule, records: Sequence[dict]) -> LinearSchedule:
    """The slope whose mean depth over the D3 run's token counts is closest to D3's (bisection)."""
    lengths = [record["tokens"] for record in records]
    target = sum(sum(record["layers"]) for record in records) / sum(lengths)

    def mean_depth(slope: float) -> float:
        schedule = LinearSchedule.like(d3_schedule, slope)
        return sum(schedule.layers_at(i) for length in lengths for i in range(length)) / sum(lengths)

    low, high = 0.0, float(d3_schedule.num_layers)
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_depth(middle) > target else (low, middle)
    best = min((low, high), key=lambda slope: abs(mean_depth(slope) - target))
    return LinearSchedule.like(d3_schedule, best)


METHOD_KINDS.update({kind.name: kind for kind in (
    MethodKind("full", matched=False, schedule=None, bridgeable=False),
    MethodKind("d3", matched=False, schedule=_d3_itself),
    MethodKind("static", matched=True, schedule=matched_static),
    MethodKind("linear", matched=True, schedule=matched_linear),
)})
METHODS = tuple(name for kind in METHOD_KINDS.values() for name in
                ((kind.name, f"{kind.name}{BRIDGED}") if kind.bridgeable else (kind.name,)))


def plan_for_run(run: MethodRun, loaded, settings: DecodeSettings, d3_records: Sequence[dict] = ()):
    """The DecodePlan of `run` for `loaded`: full depth, the D3 plan of `settings` at the run's α (its min-layers
    the user's, else the model's calibrated one), or a baseline matched to `d3_records`, the finished records
    (their "tokens" and "layers") of the D3 run `run.matched_d3`."""
    from d3cli.core.session.plan import plan_for

    kind = METHOD_KINDS[run.method]
    if kind.schedule is None:
        return plan_for(loaded, settings.full_depth())
    d3_plan = plan_for(loaded, dataclasses.replace(settings, alpha=run.alpha))
    d3_schedule = d3_plan.schedule
    if run.bridged and d3_schedule.bridge_maps is None:
        raise UserError(f"{run.name} needs bridges: this model's calibration has none (make it with d3 calibrate), "
                        "or bridges are off")
    d3_schedule = d3_schedule.with_bridge_maps(d3_schedule.bridge_maps if run.bridged else None)
    if kind.matched and not d3_records:
        raise UserError(f"{run.label} is matched to the {run.matched_d3.label} run, which has no results")
    return d3_plan.with_schedule(kind.schedule(d3_schedule, d3_records))


def bench_alphas(loaded, settings: DecodeSettings, asked: Sequence[float] | None) -> tuple[float, ...]:
    """The D3 rates a bench runs: the ones asked for, else the one the model's plan has (calibrated or default)."""
    from d3cli.core.session.plan import plan_for

    return tuple(asked) if asked else (plan_for(loaded, settings).schedule.alpha,)


def encode_examples(loaded, examples: Sequence[Example]) -> dict[str, list[int]]:
    """Every example's prompt as token ids, once for all methods; a prompt too long for the model is a UserError."""
    from d3cli.core.model.model_facts import context_length

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
    from d3cli.core.decode import engine
    from d3cli.core.decode.results import ReplyCollector
    from d3cli.evaluation import fidelity

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


def fidelity_columns(done: dict[str, dict], full: dict[str, dict], shared: Sequence[str]) -> dict:
    """A method's free-running fidelity against full depth on the examples both finished (fidelity.py): its
    repeated 4-grams, the change from full depth's (mean, worst, replies that loop where full depth's do not),
    where its replies leave full depth's path, and (a replies task) the change in the full-depth model's NLL."""
    from d3cli.evaluation.fidelity import LOOP_MARGIN, first_difference

    with_tokens = [example_id for example_id in shared if "token_ids" in done[example_id]
                   and "token_ids" in full[example_id]]
    repetitions = [record["repetition"] for record in done.values() if "repetition" in record]
    columns = {"repetition": round(sum(repetitions) / len(repetitions), 4) if repetitions else None}
    if not with_tokens:
        return columns
    deltas = [done[i]["repetition"] - full[i]["repetition"] for i in with_tokens]
    differences = [first_difference(full[i]["token_ids"], done[i]["token_ids"]) for i in with_tokens]
    left = sorted(position for position in differences if position is not None)
    columns.update({
        "delta_repetition": round(sum(deltas) / len(deltas), 4),
        "worst_delta_repetition": round(max(deltas), 4),
        "loops": sum(delta > LOOP_MARGIN for delta in deltas),
        "identical": sum(position is None for position in differences),
        "median_first_difference": left[len(left) // 2] if left else None,
    })
    scored = [i for i in with_tokens if done[i].get("nll_full_depth") is not None
              and full[i].get("nll_full_depth") is not None]
    if scored:
        columns["delta_nll"] = round(sum(done[i]["nll_full_depth"] - full[i]["nll_full_depth"] for i in scored)
                                     / len(scored), 4)
    return columns


def summarize(records: Sequence[dict], runs: Sequence[MethodRun], examples: Sequence[Example],
              num_layers: int) -> list[dict]:
    """One row per method from the records of these examples: accuracy, agreement with full, depth and speed."""
    ids = {example.id: prompt_digest(example) for example in examples}
    by_method: dict[str, dict[str, dict]] = {}
    for record in records:
        if ids.get(record["id"]) == record["prompt_sha256"]:
            by_method.setdefault(record["method"], {})[record["id"]] = record
    full = by_method.get("full", {})
    full_row = None
    rows = []
    for run in runs:
        done = by_method.get(run.key, {})
        if not done:
            continue
        tokens = sum(record["tokens"] for record in done.values())
        batch_seconds: dict[str, float] = {}
        batch_prefill: dict[str, float] = {}  # a batch's prompts share one prefill: its first tokens come together
        for record in done.values():
            batch_seconds[record["batch"]] = max(batch_seconds.get(record["batch"], 0.0), record["seconds"])
            batch_prefill[record["batch"]] = max(batch_prefill.get(record["batch"], 0.0),
                                                 record.get("first_token_seconds", 0.0))
        seconds = sum(batch_seconds.values())
        decode_seconds = seconds - sum(batch_prefill.values())
        decode_tokens = tokens - len(done)
        mean_layers = sum(sum(record["layers"]) for record in done.values()) / tokens if tokens else 0.0
        shared = [example_id for example_id in done if example_id in full]
        checked = [record for record in done.values() if record.get("gold") != ""]  # (a replies prompt may have none)
        row = {
            "name": run.name,
            "method": run.method,
            "bridges": run.bridged,
            "alpha": run.alpha,
            "label": run.label,
            "examples": len(done),
            "accuracy": _mean(record["correct"] for record in checked),
            "accuracy_flexible": _mean(record["correct_flexible"] for record in checked),
            "agreement": _mean(done[i]["flexible"] == full[i]["flexible"] for i in shared) if shared else None,
            "mean_layers": round(mean_layers, 3),
            "layer_ratio": round(mean_layers / num_layers, 4) if num_layers else None,
            "generated_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 3) if seconds else 0.0,
            "decode_tokens_per_s": round(decode_tokens / decode_seconds, 3) if decode_seconds > 0 else None,
            "seconds_per_example": round(seconds / len(done), 3),
            **fidelity_columns(done, full, shared),
        }
        if run.method == "full":
            full_row = row
        rows.append(row)
    for row in rows:
        if full_row is not None:
            row["delta_points"] = round(100 * (row["accuracy"] - full_row["accuracy"]), 2)
            row["delta_points_flexible"] = round(100 * (row["accuracy_flexible"] - full_row["accuracy_flexible"]), 2)
            row["measured_speedup"] = (round(row["tokens_per_s"] / full_row["tokens_per_s"], 3)
                                       if full_row["tokens_per_s"] else None)
            row["decode_speedup"] = (round(row["decode_tokens_per_s"] / full_row["decode_tokens_per_s"], 3)
                                     if row["decode_tokens_per_s"] and full_row["decode_tokens_per_s"] else None)
        else:
            row["delta_points"] = row["delta_points_flexible"] = row["measured_speedup"] = None
            row["decode_speedup"] = None
    return rows


def _mean(values) -> float:
    values = [bool(value) for value in values]
    return round(sum(values) / len(values), 4) if values else 0.0


def by_subtask(records: Sequence[dict], examples: Sequence[Example]) -> dict[str, dict[str, float]]:
    """Flexible accuracy per method per subtask (BBH)."""
    subtask_of = {example.id: example.subtask for example in examples if example.subtask}
    table: dict[str, dict[str, list[bool]]] = {}
    for record in records:
        subtask = subtask_of.get(record["id"])
        if subtask:
            table.setdefault(record["method"], {}).setdefault(subtask, []).append(record["correct_flexible"])
    return {method: {subtask: _mean(values) for subtask, values in subtasks.items()}
            for method, subtasks in table.items()}


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
        from d3cli.core.model.model_facts import num_decoder_layers
        from d3cli.core.session.plan import plan_for

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
        from d3cli.core.session.plan import plan_for

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
