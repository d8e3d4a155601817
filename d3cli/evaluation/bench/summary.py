"""A bench run's summary, computed from its records alone: accuracy, depth and speed per method, fidelity against
full depth, per subtask."""

from __future__ import annotations

from collections.abc import Sequence

from d3cli.evaluation.bench.methods import (
    MethodRun,
)
from d3cli.evaluation.bench.results_file import (
    prompt_digest,
)
from d3cli.evaluation.fidelity import LOOP_MARGIN, first_difference
from d3cli.evaluation.tasks.base import Example


def fidelity_columns(done: dict[str, dict], full: dict[str, dict], shared: Sequence[str]) -> dict:
    """A method's free-running fidelity against full depth on the examples both finished (fidelity.py): its
    repeated 4-grams, the change from full depth's (mean, worst, replies that loop where full depth's do not),
    where its replies leave full depth's path, and (a replies task) the change in the full-depth model's NLL."""
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
