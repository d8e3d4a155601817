"""lm-eval's GSM8K and BBH tasks pointed at d3's data folder (evaluation/harness/local_tasks.py): the files a task
needs, its configuration localized, groups opened into their tasks, and the YAMLs written for --include_path. lm-eval's
task index is a stand-in here (the real one, 15,000 YAML files, is read by test___main__.py's run)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from d3cli.evaluation.harness import local_tasks
from d3cli.evaluation.harness.local_tasks import D3_TASKS, data_files_needed, localized, task_list, write_task_yamls

GSM8K_COT = {"task": "gsm8k_cot", "tag": ["chain_of_thought"], "dataset_path": "gsm8k", "dataset_name": "main",
             "output_type": "generate_until", "doc_to_text": "Q: {{question}}\nA:"}
NAVIGATE = {"task": "bbh_cot_fewshot_navigate", "dataset_path": "lukaemon/bbh", "dataset_name": "navigate"}
SNARKS = {"task": "bbh_cot_fewshot_snarks", "dataset_path": "lukaemon/bbh", "dataset_name": "snarks"}


def entry(kind: str, config: dict):
    return SimpleNamespace(kind=SimpleNamespace(name=kind), cfg=config)


INDEX = SimpleNamespace(task_index={
    "gsm8k_cot": entry("TASK", GSM8K_COT),
    "bbh_cot_fewshot": entry("GROUP", {"task": ["bbh_cot_fewshot_navigate", {"task": "bbh_cot_fewshot_snarks"}]}),
    "bbh_cot_fewshot_navigate": entry("TASK", NAVIGATE),
    "bbh_cot_fewshot_snarks": entry("TASK", SNARKS),
    "hellaswag": entry("TASK", {"task": "hellaswag", "dataset_path": "Rowan/hellaswag"}),
})


def test_the_files_a_task_needs_and_its_configuration_reading_them(tmp_path):
    assert data_files_needed(GSM8K_COT) == ["gsm8k/test.jsonl", "gsm8k/train.jsonl"]
    assert data_files_needed(NAVIGATE) == ["bbh/tasks/navigate.json"]
    assert data_files_needed({"dataset_path": "Rowan/hellaswag"}) == []
    local = localized(GSM8K_COT, tmp_path)
    assert local == {**{key: value for key, value in GSM8K_COT.items() if key != "dataset_name"},
                     "dataset_path": "json",
                     "dataset_kwargs": {"data_files": {"test": str(tmp_path / "gsm8k" / "test.jsonl"),
                                                       "train": str(tmp_path / "gsm8k" / "train.jsonl")}}}
    assert GSM8K_COT["dataset_path"] == "gsm8k" and "dataset_kwargs" not in GSM8K_COT  # the original untouched
    assert localized(NAVIGATE, tmp_path)["dataset_kwargs"] == {
        "data_files": {"test": str(tmp_path / "bbh" / "tasks" / "navigate.json")}, "field": "examples"}


def test_task_list_localizes_gsm8k_and_bbh_opens_groups_and_leaves_other_tasks_by_name(tmp_path):
    required = []
    tasks = task_list(["gsm8k_cot", "bbh_cot_fewshot", "hellaswag", "no_such_task", "bbh_mc_navigate"], INDEX,
                      tmp_path, required.append)
    assert tasks == [localized(GSM8K_COT, tmp_path), localized(NAVIGATE, tmp_path), localized(SNARKS, tmp_path),
                     "hellaswag", "no_such_task", localized(D3_TASKS["bbh_mc_navigate"], tmp_path)]
    assert required == [["gsm8k/test.jsonl", "gsm8k/train.jsonl"], ["bbh/tasks/navigate.json"],
                        ["bbh/tasks/snarks.json"], ["bbh/tasks/navigate.json"]]
    assert task_list(["gsm8k_cot", "bbh_cot_fewshot"], INDEX, None) == ["gsm8k_cot", "bbh_cot_fewshot"]  # no folder
    with pytest.raises(ValueError, match=r"^bbh_mc_navigate is a d3 task: it needs d3's data folder$"):
        task_list(["bbh_mc_navigate"], INDEX, None)


def test_yamls_are_written_as_name_local_without_lm_evals_tags(tmp_path):
    written = write_task_yamls(["gsm8k_cot", "bbh_cot_fewshot"], tmp_path / "data", tmp_path / "out", INDEX)
    assert [path.name for path in written] == ["gsm8k_cot_local.yaml", "bbh_cot_fewshot_navigate_local.yaml",
                                               "bbh_cot_fewshot_snarks_local.yaml"]
    config = yaml.safe_load(written[0].read_text(encoding="utf-8"))
    expected = {**localized(GSM8K_COT, tmp_path / "data"), "task": "gsm8k_cot_local"}
    expected.pop("tag")
    assert config == expected
    with pytest.raises(ValueError, match=r"^hellaswag does not read GSM8K or BBH: nothing to point at local files$"):
        write_task_yamls(["hellaswag"], tmp_path / "data", tmp_path / "out", INDEX)


def test_the_command_prints_each_yaml_or_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(local_tasks, "task_manager_for", lambda include_path=None: INDEX)
    assert local_tasks.main(["gsm8k_cot", "--data-dir", str(tmp_path), "--output", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'out' / 'gsm8k_cot_local.yaml'}\n"
    assert local_tasks.main(["hellaswag", "--data-dir", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("d3: error: hellaswag does not read GSM8K or BBH: nothing to point at local "
                                       "files\n")
