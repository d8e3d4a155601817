"""d3's GSM8K and BBH scoring against lm-eval's own gsm8k_cot and bbh_cot_fewshot configurations, on fixed outputs."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from d3cli.evaluation.harness.crosscheck import verdicts  # noqa: E402
from d3cli.evaluation.tasks import get_task  # noqa: E402
from d3cli.evaluation.tasks.base import TaskOptions, read_json, read_jsonl  # noqa: E402


def judged(shared_data, task_name, subtask, outputs):
    task = get_task(task_name)
    if task_name == "gsm8k":
        examples = task.examples(shared_data, TaskOptions(limit=1))
        doc = read_jsonl(shared_data / "gsm8k" / "test.jsonl")[0]
    else:
        examples = task.examples(shared_data, TaskOptions(subtasks=(subtask,), limit=1))
        doc = read_json(shared_data / "bbh" / "tasks" / f"{subtask}.json")["examples"][0]
    found = verdicts(task, examples * len(outputs), [doc] * len(outputs), outputs)
    return {(verdict.kind, output): verdict for verdict, output in zip(found, outputs * 2)}, doc


GSM8K_AGREE = ["So 16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The answer is 18.", "The answer is $18.", "The answer is 18",
               "The answer is 1,8.", "she makes 18 dollars", "The answer is -18.", "The answer is 18.5.\nQ: next"]
# d3 compares numbers by value, lm-eval compares the extracted strings: these count for d3 only (docs/LM_EVAL.md)
GSM8K_DIFFER = {("strict", "The answer is 18.00."), ("strict", "The answer is 018."), ("flexible", "18.00"),
                ("flexible", "The answer is 18.00."), ("flexible", "The answer is 018.")}


def test_gsm8k_verdicts_agree_except_where_numbers_equal_in_value_are_written_differently(shared_data):
    outputs = GSM8K_AGREE + sorted({output for _, output in GSM8K_DIFFER})
    found, _ = judged(shared_data, "gsm8k", None, outputs)
    differ = {key for key, verdict in found.items() if not verdict.agrees}
    assert differ == GSM8K_DIFFER
    assert all(found[key].d3_correct and not found[key].lm_eval_correct for key in differ)
    assert found[("strict", GSM8K_AGREE[0])].lm_eval_correct and found[("flexible", GSM8K_AGREE[4])].d3_correct


@pytest.mark.parametrize("subtask", ["date_understanding", "boolean_expressions", "word_sorting"])
def test_bbh_verdicts_agree(shared_data, subtask):
    _, doc = judged(shared_data, "bbh", subtask, ["x"])
    target = doc["target"]
    outputs = [f"So the answer is {target}.", f"So the answer is {target}", f"so the answer is {target}.",
               f"So the answer is  {target}.", f"So the answer is {target}.\n\nQ: x. So the answer is no.",
               f"The answer is {target.lower()}."]
    found, _ = judged(shared_data, "bbh", subtask, outputs)
    assert all(verdict.agrees for verdict in found.values())
    assert found[("strict", outputs[0])].d3_correct and not found[("strict", outputs[1])].d3_correct
