"""What a task is (evaluation/tasks/base.py) and the registry (evaluation/tasks/__init__.py): references and
offsets, unknown tasks and subtasks, an example's prompt encoded as every command encodes it, and the JSON readers
and `take`."""

from __future__ import annotations

import re

import pytest

from d3cli.base.errors import UserError
from d3cli.evaluation.tasks import get_task
from d3cli.evaluation.tasks.base import Example, TaskOptions, read_json, read_jsonl, take


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


def test_unknown_tasks_and_subtasks():
    with pytest.raises(UserError, match="did you mean 'gsm8k'"):
        get_task("gsm8")
    with pytest.raises(UserError, match="did you mean 'navigate'"):
        get_task("bbh").files(TaskOptions(subtasks=("navigat",)))
    with pytest.raises(UserError, match="no subtasks"):
        get_task("gsm8k").examples(None, TaskOptions(subtasks=("navigate",)))


def test_an_example_encodes_its_prompt_as_every_command_does(tokenizer):
    from d3cli.core.text.prompts import encode_chat

    chat = Example("t/0", "What is 2 + 2?", "4", chat=True)
    raw = Example("t/1", "Q: What is 2 + 2?\nA:", "4")
    assert chat.prompt_ids(tokenizer) == encode_chat(tokenizer, [{"role": "user", "content": chat.prompt}])
    assert raw.prompt_ids(tokenizer) == list(tokenizer(raw.prompt, add_special_tokens=True)["input_ids"])
    assert chat.prompt_ids(tokenizer) != Example("t/0", chat.prompt, "4").prompt_ids(tokenizer)


def test_read_jsonl_numbers_its_rows_by_line_and_names_a_bad_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"b": "x"}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1, "_line": 1}, {"b": "x", "_line": 4}]  # blank lines skipped, still counted
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:2: expected a JSON object$"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:2: not valid JSON \(Expecting value\)$"):
        read_jsonl(path)
    path.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(UserError, match=rf"^cannot read {re.escape(str(path))}: "):
        read_jsonl(path)
    with pytest.raises(UserError, match=rf"^cannot read {re.escape(str(tmp_path / 'none.jsonl'))}: No such file"):
        read_jsonl(tmp_path / "none.jsonl")


def test_read_json_names_the_line_and_column_of_a_mistake(tmp_path):
    path = tmp_path / "task.json"
    path.write_text('{"examples": [1, 2]}', encoding="utf-8")
    assert read_json(path) == {"examples": [1, 2]}
    path.write_text('{"examples": [\n  1,\n  ]\n}', encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:3:3: not valid JSON \("):
        read_json(path)
    with pytest.raises(UserError, match=rf"^cannot read {re.escape(str(tmp_path / 'none.json'))}: No such file"):
        read_json(tmp_path / "none.json")


def test_take_skips_the_offset_then_keeps_the_limit():
    examples = [Example(f"t/{index}", "", "") for index in range(5)]
    assert take(examples, TaskOptions()) == examples
    assert [example.id for example in take(examples, TaskOptions(offset=1, limit=2))] == ["t/1", "t/2"]
    assert [example.id for example in take(examples, TaskOptions(offset=3))] == ["t/3", "t/4"]
    assert take(examples, TaskOptions(limit=0)) == [] and take(examples, TaskOptions(offset=9, limit=2)) == []
