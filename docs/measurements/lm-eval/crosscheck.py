"""Score the outputs of recorded `d3 bench` runs with d3's tasks and with lm-eval's task configurations, and count.

    .venv/bin/python docs/measurements/lm-eval/crosscheck.py ../shared/data docs/measurements/bench/gsm8k-bridges.jsonl \
        docs/measurements/bench/bbh-bridges.jsonl > docs/measurements/lm-eval/crosscheck.json

Prints one JSON object: per file, task and answer kind, how many outputs each scorer counts correct, how many
verdicts differ, and every differing output (id, both answers, both verdicts).
"""

import json
import sys
from pathlib import Path

from d3cli.evaluation.harness.crosscheck import verdicts
from d3cli.evaluation.tasks import get_task
from d3cli.evaluation.tasks.base import TaskOptions, read_json, read_jsonl


def documents(folder: Path, example_id: str) -> dict:
    parts = example_id.split("/")
    if parts[0] == "gsm8k":
        return read_jsonl(folder / "gsm8k" / "test.jsonl")[int(parts[1])]
    return read_json(folder / "bbh" / "tasks" / f"{parts[1]}.json")["examples"][int(parts[2])]


def main(folder: Path, paths: list[Path]) -> dict:
    report = {}
    for path in paths:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        run = records[0]
        task = get_task(run["task"])
        examples = {example.id: example for example in task.examples(folder, TaskOptions(shots=run["shots"],
                                                                                          chat=run["chat"]))}
        outputs = [record for record in records if record.get("type") == "example"]
        chosen = [examples[record["id"]] for record in outputs]
        docs = [documents(folder, record["id"]) for record in outputs]
        found = verdicts(task, chosen, docs, [record["output"] for record in outputs])
        rows = {}
        for verdict in found:
            row = rows.setdefault(verdict.kind, {"outputs": 0, "d3_correct": 0, "lm_eval_correct": 0,
                                                 "differ": 0, "differences": []})
            row["outputs"] += 1
            row["d3_correct"] += verdict.d3_correct
            row["lm_eval_correct"] += verdict.lm_eval_correct
            if not verdict.agrees:
                row["differ"] += 1
                row["differences"].append({"id": verdict.id, "d3": verdict.d3_answer, "d3_correct": verdict.d3_correct,
                                           "lm_eval": verdict.lm_eval_answer,
                                           "lm_eval_correct": verdict.lm_eval_correct})
        report[path.name] = {"task": run["task"], "outputs": len(outputs), "by_kind": rows}
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]), indent=1))
