"""BIG-Bench Hard (evaluation/tasks/bbh.py): its 27 subtasks and their chain-of-thought prompts, the canary stripped,
the two answer extractors per kind of subtask, free answers compared by words, and a malformed file named."""

from __future__ import annotations

import pytest

from d3cli.base.errors import UserError
from d3cli.evaluation.tasks import get_task
from d3cli.evaluation.tasks.base import INVALID, TaskOptions
from d3cli.evaluation.tasks.bbh import SUBTASKS, strip_canary


def test_bbh_has_27_subtasks_and_6511_examples(shared_data):
    task = get_task("bbh")
    examples = task.examples(shared_data, TaskOptions())
    assert len(SUBTASKS) == 27 and len(examples) == 6511
    date = next(example for example in examples if example.subtask == "date_understanding")
    assert "canary" not in date.prompt and "-----" not in date.prompt
    assert date.prompt.startswith("Infer the date from context.\n\nQ: ")
    assert date.prompt.count("\nA: Let's think step by step.\n") == 4
    assert date.prompt.endswith("\nA: Let's think step by step.\n")
    limited = task.examples(shared_data, TaskOptions(subtasks=("navigate", "word_sorting"), limit=5, shots=1))
    assert [example.id for example in limited][:2] == ["bbh/navigate/0", "bbh/navigate/1"] and len(limited) == 10
    assert limited[0].prompt.count("Let's think step by step.") == 2


def test_strip_canary_keeps_prompts_without_one():
    assert strip_canary("BENCHMARK DATA canary GUID x\n-----\nDescribe.\n\nQ: a") == "Describe.\n\nQ: a"
    assert strip_canary("Describe.\n\nQ: a") == "Describe.\n\nQ: a"


@pytest.mark.parametrize(
    "subtask, output, strict, flexible",
    [
        ("date_understanding", "So today is 12/14/1937. So the answer is (D).", "(D)", "(D)"),
        ("date_understanding", "It must be (B), not (C)... I pick (A)", INVALID, "(A)"),
        ("object_counting", "1 + 2 + 3 = 6. So the answer is 6.", "6", "6"),
        ("multistep_arithmetic_two", "(-3 * 4) = -12 and then -151", INVALID, "-151"),
        ("boolean_expressions", "Z = not True = False. So the answer is False.", "False", "False"),
        ("sports_understanding", "This is plausible. So the answer is yes.", "yes", "yes"),
        ("web_of_lies", "so Jim tells the truth: YES", INVALID, "Yes"),
        ("word_sorting", "So the answer is apple banana cherry.", "apple banana cherry", "apple banana cherry"),
        ("dyck_languages", "we close: ) ]", INVALID, "we close: ) ]"),
    ],
)
def test_bbh_extraction(subtask, output, strict, flexible):
    from d3cli.evaluation.tasks.base import Example

    answer = get_task("bbh").extract(output, Example("x", "", "", subtask=subtask))
    assert (answer.strict, answer.flexible) == (strict, flexible)


def test_bbh_scoring_compares_free_answers_by_words():
    from d3cli.evaluation.tasks.base import Example

    task = get_task("bbh")
    example = Example("x", "", "apple banana", subtask="word_sorting")
    assert task.is_correct("apple  banana", example) and not task.is_correct(INVALID, example)


def test_bbh_malformed_file_is_named(tmp_path):
    (tmp_path / "bbh" / "tasks").mkdir(parents=True)
    (tmp_path / "bbh" / "tasks" / "navigate.json").write_text('{"examples": [\n{"input": 1}\n')
    with pytest.raises(UserError, match=r"navigate.json:3:1: not valid JSON"):
        get_task("bbh").examples(tmp_path, TaskOptions(subtasks=("navigate",), chat=True))
