"""GSM8K and BBH: examples, prompts, and the two answer extractors."""

from __future__ import annotations

import json

import pytest

from d3cli.base.errors import UserError
from d3cli.evaluation.tasks import get_task
from d3cli.evaluation.tasks.base import INVALID, Example, TaskOptions
from d3cli.evaluation.tasks.bbh import SUBTASKS, strip_canary
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


def test_references_and_offsets(shared_data):
    gsm8k = get_task("gsm8k")
    later = gsm8k.examples(shared_data, TaskOptions(limit=3, offset=2))
    assert [example.id for example in later] == ["gsm8k/2", "gsm8k/3", "gsm8k/4"]
    first = gsm8k.examples(shared_data, TaskOptions(limit=1))[0]
    assert first.reference.startswith(" ") and first.reference.endswith("The answer is 18.")
    assert "<<" not in first.reference and "####" not in first.reference
    bbh = get_task("bbh").examples(shared_data, TaskOptions(subtasks=("navigate",), limit=2, offset=1))
    assert [example.id for example in bbh] == ["bbh/navigate/1", "bbh/navigate/2"]
    assert bbh[0].reference == f"So the answer is {bbh[0].gold}."


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


def test_unknown_tasks_and_subtasks():
    with pytest.raises(UserError, match="did you mean 'gsm8k'"):
        get_task("gsm8")
    with pytest.raises(UserError, match="did you mean 'navigate'"):
        get_task("bbh").files(TaskOptions(subtasks=("navigat",)))
    with pytest.raises(UserError, match="no subtasks"):
        get_task("gsm8k").examples(None, TaskOptions(subtasks=("navigate",)))


def test_bbh_malformed_file_is_named(tmp_path):
    (tmp_path / "bbh" / "tasks").mkdir(parents=True)
    (tmp_path / "bbh" / "tasks" / "navigate.json").write_text('{"examples": [\n{"input": 1}\n')
    with pytest.raises(UserError, match=r"navigate.json:3:1: not valid JSON"):
        get_task("bbh").examples(tmp_path, TaskOptions(subtasks=("navigate",), chat=True))


def test_an_example_encodes_its_prompt_as_every_command_does(tokenizer):
    from d3cli.core.text.prompts import encode_chat

    chat = Example("t/0", "What is 2 + 2?", "4", chat=True)
    raw = Example("t/1", "Q: What is 2 + 2?\nA:", "4")
    assert chat.prompt_ids(tokenizer) == encode_chat(tokenizer, [{"role": "user", "content": chat.prompt}])
    assert raw.prompt_ids(tokenizer) == list(tokenizer(raw.prompt, add_special_tokens=True)["input_ids"])
    assert chat.prompt_ids(tokenizer) != Example("t/0", chat.prompt, "4").prompt_ids(tokenizer)
