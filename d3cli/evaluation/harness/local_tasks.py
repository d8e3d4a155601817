"""lm-eval's GSM8K and BBH tasks read from d3's data folder instead of the Hugging Face hub.

Each task's own configuration (prompt, few-shot examples, filters, metrics) is kept; only where its documents come
from changes: `dataset_path: json` with `data_files` in the folder `d3 bench` uses (`--data-dir`, $D3_DATA_DIR or
the download cache). A group (`bbh_cot_fewshot`) becomes its tasks. Other tasks are left to lm-eval as named.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

GSM8K_SOURCES = {"openai/gsm8k", "gsm8k", "d3/gsm8k"}
BBH_SOURCES = {"SaylorTwift/bbh", "lukaemon/bbh", "d3/bbh"}

# Multiple-choice forms of the BBH subtasks whose answers are one of two words: lm-eval scores each choice's
# log-likelihood after the question, zero-shot (accuracy: the likelier choice is the target). d3's own tasks, for
# measuring D3 on log-likelihood requests with the data d3 already has.
MULTIPLE_CHOICE_ANSWERS = {
    "boolean_expressions": ("True", "False"),
    "causal_judgement": ("Yes", "No"),
    "formal_fallacies": ("valid", "invalid"),
    "navigate": ("Yes", "No"),
    "sports_understanding": ("yes", "no"),
    "web_of_lies": ("Yes", "No"),
}
D3_TASKS = {
    f"bbh_mc_{subtask}": {
        "task": f"bbh_mc_{subtask}",
        "dataset_path": "d3/bbh",
        "dataset_name": subtask,
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "Q: {{input}}\nA:",
        "doc_to_choice": list(answers),
        "doc_to_target": "{{" + repr(list(answers)) + ".index(target)}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    for subtask, answers in MULTIPLE_CHOICE_ANSWERS.items()
}
# Each GSM8K question with its reference solution, scored as one document (lm-eval's loglikelihood_rolling: bits per
# byte, byte and word perplexity): D3 over a hundred-odd tokens, where a two-word answer above is scored at (nearly)
# full depth. The document's tokens are D3's generated tokens 0, 1, 2, ... after the prefix token.
D3_TASKS["gsm8k_solutions_rolling"] = {
    "task": "gsm8k_solutions_rolling",
    "dataset_path": "d3/gsm8k",
    "output_type": "loglikelihood_rolling",
    "test_split": "test",
    "doc_to_text": "",
    "doc_to_target": "Question: {{question}}\nAnswer: {{answer}}",
    "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
    "metadata": {"version": 1.0},
}


def data_files_needed(config: dict) -> list[str]:
    """The files of d3's data folder a task's configuration needs (relative paths), or [] for another source."""
    source = config.get("dataset_path")
    if source in GSM8K_SOURCES:
        return ["gsm8k/test.jsonl", "gsm8k/train.jsonl"]
    if source in BBH_SOURCES:
        return [f"bbh/tasks/{config['dataset_name']}.json"]
    return []


def localized(config: dict, folder: Path) -> dict:
    """`config` reading its documents from `folder` (a GSM8K or BBH task's configuration)."""
    needed = [str(folder / relative) for relative in data_files_needed(config)]
    local = copy.deepcopy(config)
    local.pop("dataset_name", None)
    local["dataset_path"] = "json"
    if config.get("dataset_path") in GSM8K_SOURCES:
        local["dataset_kwargs"] = {"data_files": {"test": needed[0], "train": needed[1]}}
    else:  # a BBH task file: {"canary": ..., "examples": [{"input", "target"}, ...]}
        local["dataset_kwargs"] = {"data_files": {"test": needed[0]}, "field": "examples"}
    return local


@functools.lru_cache(maxsize=4)
def task_manager_for(include_path: str | None = None):
    """lm-eval's index of its installed tasks, and of the YAMLs in `include_path`: built once per process and
    folder (it reads some 15,000 YAML files, 7 s here); lm-eval reads a task's files again whenever it loads one."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def task_list(names, task_manager, folder: Path | None, require=None) -> list:
    """What to hand `lm_eval.simple_evaluate(tasks=...)`: GSM8K/BBH task configurations localized to `folder`
    (`require(relative_paths)` makes sure their files are there first), every other name as it is."""
    index = task_manager.task_index
    tasks: list = []
    for name in names:
        if name in D3_TASKS:
            config = D3_TASKS[name]
            if folder is None:
                raise ValueError(f"{name} is a d3 task: it needs d3's data folder")
            if require is not None:
                require(data_files_needed(config))
            tasks.append(localized(config, folder))
            continue
        entry = index.get(name)
        if entry is None or folder is None:
            tasks.append(name)
            continue
        if entry.kind.name == "GROUP":
            tasks += task_list(_group_tasks(entry), task_manager, folder, require)
            continue
        config = dict(entry.cfg)
        needed = data_files_needed(config)
        if not needed:
            tasks.append(name)
            continue
        if require is not None:
            require(needed)
        tasks.append(localized(config, folder))
    return tasks


def _group_tasks(entry) -> list[str]:
    members = entry.cfg.get("task", [])
    return [member if isinstance(member, str) else member.get("task") for member in members]


def write_task_yamls(names, folder: Path, output: Path, task_manager=None) -> list[Path]:
    """lm-eval task YAMLs of `names` that read `folder` (each named NAME_local), for lm-eval's `--include_path`."""
    import yaml

    task_manager = task_manager or task_manager_for()
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for config in task_list(names, task_manager, folder):
        if isinstance(config, str):
            raise ValueError(f"{config} does not read GSM8K or BBH: nothing to point at local files")
        config = dict(config, task=f"{config['task']}_local")
        config.pop("tag", None)  # a tag would group the copy with lm-eval's own tasks
        path = output / f"{config['task']}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
        written.append(path)
    return written


def main(argv=None) -> int:
    """`python -m d3cli.evaluation.harness.local_tasks --data-dir DIR --output DIR TASK...`"""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m d3cli.evaluation.harness.local_tasks",
                                     description="Write lm-eval task YAMLs (NAME_local) that read GSM8K and BBH "
                                                 "from a local folder, for lm-eval's --include_path.")
    parser.add_argument("tasks", nargs="+", help="lm-eval task or group names (gsm8k_cot, bbh_cot_fewshot, ...) or "
                                                 "d3's bbh_mc_SUBTASK")
    parser.add_argument("--data-dir", type=Path, required=True, help="the folder with gsm8k/ and bbh/")
    parser.add_argument("--output", type=Path, required=True, help="where to write the YAML files")
    args = parser.parse_args(argv)
    try:
        for path in write_task_yamls(args.tasks, args.data_dir.resolve(), args.output):
            print(path)
    except (ValueError, KeyError) as error:
        sys.stderr.write(f"d3: error: {error}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
