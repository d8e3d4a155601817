"""Scoring cross-check: the same generated outputs scored by d3's tasks and by lm-eval's own task configuration.

d3 bench's GSM8K scoring claims to follow lm-eval's `gsm8k_cot` (strict-match, flexible-extract) and its BBH scoring
`bbh_cot_fewshot` (get-answer). `verdicts` applies lm-eval's filters and metric, read from lm-eval's installed task
configuration, to outputs d3 scored, so the claim is checked by running both, not by reading them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from d3cli.evaluation.harness.local_tasks import task_manager_for
from d3cli.evaluation.tasks.base import Example

# d3's answer kind -> the lm-eval filter it mirrors, per d3 task
FILTERS = {
    "gsm8k": ("gsm8k_cot", {"strict": "strict-match", "flexible": "flexible-extract"}),
    "bbh": ("bbh_cot_fewshot_{subtask}", {"strict": "get-answer"}),
}


@dataclass(frozen=True)
class Verdict:
    id: str
    kind: str  # "strict" or "flexible"
    d3_answer: str
    d3_correct: bool
    lm_eval_answer: str
    lm_eval_correct: bool

    @property
    def agrees(self) -> bool:
        return self.d3_correct == self.lm_eval_correct


def lm_eval_config(task_name: str, task_manager=None) -> dict:
    entry = (task_manager or task_manager_for()).task_index.get(task_name)
    if entry is None:
        raise KeyError(f"lm-eval has no task {task_name}")
    return dict(entry.cfg)


def lm_eval_answers(config: dict, filter_name: str, outputs: Sequence[str], docs: Sequence[dict]) -> list[str]:
    """Each output through the named filter pipeline of the task's configuration (regex, take_first, ...)."""
    import lm_eval.filters  # noqa: F401 - registers the filters
    from lm_eval.api.registry import get_filter

    (pipeline,) = [entry for entry in config["filter_list"] if entry["name"] == filter_name]
    responses = [[output] for output in outputs]
    for step in pipeline["filter"]:
        arguments = {key: value for key, value in step.items() if key != "function"}
        responses = list(get_filter(step["function"])(**arguments).apply(responses, list(docs)))
    return [response if isinstance(response, str) else response[0] for response in responses]


def lm_eval_correct(config: dict, answers: Sequence[str], docs: Sequence[dict]) -> list[bool]:
    """The task's exact_match, item by item, against the task's own target of each document."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.utils import apply_template

    (metric,) = [entry for entry in config["metric_list"] if entry["metric"] == "exact_match"]
    options = {key: metric[key] for key in ("ignore_case", "ignore_punctuation", "regexes_to_ignore") if key in metric}
    verdicts = []
    for answer, doc in zip(answers, docs):
        target = apply_template(config["doc_to_target"], doc)
        verdicts.append(bool(exact_match_hf_evaluate(predictions=[answer], references=[target], **options)
                             ["exact_match"]))
    return verdicts


def verdicts(task, examples: Sequence[Example], docs: Sequence[dict], outputs: Sequence[str],
             task_manager=None) -> list[Verdict]:
    """d3's verdict and lm-eval's on each output, for each answer kind lm-eval has a filter for."""
    name_pattern, kinds = FILTERS[task.name]
    found = []
    by_config: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_config.setdefault(name_pattern.format(subtask=example.subtask), []).append(index)
    for config_name, indices in by_config.items():
        config = lm_eval_config(config_name, task_manager)
        group_docs = [docs[index] for index in indices]
        group_outputs = [outputs[index] for index in indices]
        for kind, filter_name in kinds.items():
            answers = lm_eval_answers(config, filter_name, group_outputs, group_docs)
            correct = lm_eval_correct(config, answers, group_docs)
            for index, answer, is_correct in zip(indices, answers, correct):
                d3_answer = getattr(task.extract(outputs[index], examples[index]), kind)
                found.append(Verdict(examples[index].id, kind, d3_answer,
                                     task.is_correct(d3_answer, examples[index]), answer, is_correct))
    return found
