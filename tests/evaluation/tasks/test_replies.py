"""The replies task (evaluation/tasks/replies.py): d3's everyday prompts as examples, their answer checks carried as
the gold and judged yes or no, and the options it refuses."""

from __future__ import annotations

import json

import pytest

from d3cli.base.errors import UserError
from d3cli.evaluation.builtin_prompts import builtin_reply_prompts
from d3cli.evaluation.tasks import get_task
from d3cli.evaluation.tasks.base import INVALID, Answer, TaskOptions


def test_every_builtin_prompt_is_an_example_with_its_check_as_the_gold():
    task = get_task("replies")
    examples = {example.id: example for example in task.examples(None, TaskOptions())}
    prompts = builtin_reply_prompts()
    assert list(examples) == [f"replies/{prompt.id}" for prompt in prompts] and task.files(TaskOptions()) == []
    for prompt in prompts:
        example = examples[f"replies/{prompt.id}"]
        assert (example.prompt, example.chat, example.subtask) == (prompt.text, prompt.kind == "chat", "")
    assert json.loads(examples["replies/multiply"].gold) == {"number": "391", "words": []}
    assert json.loads(examples["replies/capital"].gold) == {"number": None, "words": ["Tokyo"]}
    assert examples["replies/haiku"].gold == ""  # a prompt without a check
    offset = task.examples(None, TaskOptions(offset=1, limit=2))
    assert [example.id for example in offset] == [f"replies/{prompt.id}" for prompt in prompts[1:3]]


def test_a_reply_is_judged_by_its_prompts_check():
    task = get_task("replies")
    examples = {example.id: example for example in task.examples(None, TaskOptions())}
    multiply, capital, haiku = examples["replies/multiply"], examples["replies/capital"], examples["replies/haiku"]
    assert task.extract("17 × 23 = 391.", multiply) == Answer("yes", "yes")
    assert task.extract("It is 3910, or 39.", multiply) == Answer("no", "no")
    assert task.extract("The capital of Japan is tokyo.", capital) == Answer("yes", "yes")
    assert task.extract("Kyoto", capital) == Answer("no", "no")
    assert task.extract("Leaves fall", haiku) == Answer(INVALID, INVALID)  # nothing to check
    assert task.is_correct("yes", multiply) and not task.is_correct("no", multiply)
    assert not task.is_correct(INVALID, haiku)


@pytest.mark.parametrize("options, message", [
    (TaskOptions(subtasks=("navigate",)), "replies has no subtasks (--subtasks is for bbh)"),
    (TaskOptions(shots=2), "replies takes no shots: its prompts are asked as they are"),
])
def test_replies_refuses_subtasks_and_shots(options, message):
    with pytest.raises(UserError) as raised:
        get_task("replies").examples(None, options)
    assert str(raised.value) == message
    assert len(get_task("replies").examples(None, TaskOptions(shots=0, limit=1))) == 1  # zero shots: as asked
