"""GSM8K (evaluation/tasks/gsm8k.py): its examples and eight-shot prompt, the two answer extractors, numbers compared
after normalising, and malformed files named by line."""

from __future__ import annotations

import json

import pytest

from d3cli.base.errors import UserError
from d3cli.evaluation.tasks import get_task
from d3cli.evaluation.tasks.base import INVALID, TaskOptions
from d3cli.evaluation.tasks.gsm8k import normalize_number


def test_gsm8k_examples_and_the_eight_shot_prompt(shared_data):
    task = get_task("gsm8k")
    examples = task.examples(shared_data, TaskOptions())
    assert len(examples) == 1319
    first = examples[0]
    assert first.id == "gsm8k/0" and first.gold == "18"
    assert first.prompt.count("Question: ") == 9 and first.prompt.endswith("\nAnswer:")
    assert first.prompt.count("The answer is ") == 8 and "<<" not in first.prompt and "####" not in first.prompt
    assert task.examples(shared_data, TaskOptions(shots=0, limit=2))[1].prompt.startswith("Question: ")
    chat = task.examples(shared_data, TaskOptions(chat=True, limit=1))[0]
    assert chat.chat and "Question:" not in chat.prompt and "The answer is N." in chat.prompt
    with pytest.raises(UserError, match="0 to 8 shots"):
        task.examples(shared_data, TaskOptions(shots=9))


@pytest.mark.parametrize(
    "output, strict, flexible",
    [
        ("16 - 3 - 4 = 9 eggs. 9 * 2 = 18. The answer is 18.", "18", "18"),
        ("She makes $1,234.00 a day. The answer is $1,234.", INVALID, "1234"),
        ("The answer is 1,234.\n\n", "1234", "1234"),
        ("It is 18.0 dollars", INVALID, "18"),
        ("The answer is -7. Then 12", "-7", "12"),
        ("The answer is 0.50.", "0.5", "0.5"),
        ("no numbers at all", INVALID, INVALID),
        # gsm8k_cot's strict pattern ends in "." (any character): with nothing after "42" it backtracks to "4"
        ("The answer is 42", "4", "42"),
    ],
)
def test_gsm8k_extraction(output, strict, flexible):
    task = get_task("gsm8k")
    answer = task.extract(output, None)
    assert (answer.strict, answer.flexible) == (strict, flexible)


def test_gsm8k_numbers_compare_after_normalising():
    assert normalize_number("1,234") == normalize_number("$1234.00") == normalize_number("1234.") == "1234"
    assert normalize_number("0.50") == "0.5" and normalize_number("-3") == "-3"
    assert normalize_number("abc") == INVALID and normalize_number("...") == INVALID


def test_gsm8k_malformed_files_name_file_and_line(tmp_path, shared_data):
    (tmp_path / "gsm8k").mkdir()
    good = (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]
    (tmp_path / "gsm8k" / "test.jsonl").write_text("\n".join([*good, "{broken"]) + "\n")
    with pytest.raises(UserError, match=r"test.jsonl:4: not valid JSON"):
        get_task("gsm8k").examples(tmp_path, TaskOptions(shots=0))
    (tmp_path / "gsm8k" / "test.jsonl").write_text(good[0] + "\n" + json.dumps({"question": "q", "answer": "a"}))
    with pytest.raises(UserError, match=r"test.jsonl:2: the answer has no"):
        get_task("gsm8k").examples(tmp_path, TaskOptions(shots=0))
