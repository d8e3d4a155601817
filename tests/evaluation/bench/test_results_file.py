"""A bench run's results file (evaluation/bench/results_file.py): it refuses to overwrite, checks settings on resume,
survives a cut-short last line, reads the rank files of a data-parallel run and merges them in one process's order."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from d3cli.base.errors import UserError
from d3cli.evaluation.bench.methods import MethodRun
from d3cli.evaluation.bench.results_file import (
    ResultsFile,
    merged_order,
    prompt_digest,
    rank_file,
    rank_files,
)
from d3cli.evaluation.tasks.base import Example
from evaluation.bench.test_summary import record


def test_results_file_refuses_to_overwrite_and_checks_settings_on_resume(tmp_path):
    path = tmp_path / "run.jsonl"
    identity = {"task": "gsm8k", "model": "m", "shots": None, "chat": False, "decode": {"max_new_tokens": 8},
                "alphas": [0.9], "methods": ["full", "d3"]}
    results = ResultsFile(path, identity, resume=False)
    results.add(record("full", "e0", True, "1"))
    results.close()
    with pytest.raises(UserError, match="--resume"):
        ResultsFile(path, identity, resume=False)
    with pytest.raises(UserError, match="decode differ"):
        ResultsFile(path, {**identity, "decode": {"max_new_tokens": 16}}, resume=True)
    with open(path, "a") as handle:
        handle.write('{"type": "example", "method": "full", "id": "e1", "cut sh')  # a SIGKILL mid-write
    resumed = ResultsFile(path, {**identity, "alphas": [0.9, 0.95]}, resume=True)  # more α: allowed
    assert [r["id"] for r in resumed.records] == ["e0"]
    resumed.close()
    lines = path.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the cut-short line is gone
    with pytest.raises(UserError, match="nothing to resume"):
        ResultsFile(tmp_path / "other.jsonl", identity, resume=True)


def examples_of(count: int) -> list[Example]:
    return [Example(f"e{i}", f"prompt e{i}", "1") for i in range(count)]


def example_record(method: str, example: Example, **extra) -> dict:
    return {"type": "example", "method": method, "id": example.id, "prompt_sha256": prompt_digest(example),
            "output": f"{method} {example.id}", **extra}


def test_merged_records_come_in_one_process_order_whoever_wrote_them():
    examples = examples_of(5)
    runs = [MethodRun("full", None), MethodRun("d3", 0.9), MethodRun("static", 0.9)]
    single = [example_record(run.key, example) for run in runs for example in examples]
    by_rank = [[record for record in single if int(record["id"][1:]) % 2 == rank] for rank in range(2)]
    foreign = example_record("d3@0.5", examples[0])  # an α of an earlier session: kept, after this run's records
    other_prompt = {**example_record("full", examples[1]), "prompt_sha256": "another prompt"}
    arrived = [foreign, *by_rank[1], other_prompt, *by_rank[0], by_rank[0][0]]  # and one record twice
    merged = merged_order(arrived, runs, examples)
    assert merged == [*single, foreign, other_prompt]


IDENTITY = {"task": "gsm8k", "model": "m", "shots": None, "chat": False, "decode": {"max_new_tokens": 8},
            "alphas": [0.9], "methods": ["full", "d3"]}


def write_lines(path: Path, lines: list[dict], cut_short: bool = False) -> None:
    text = "".join(json.dumps(line) + "\n" for line in lines)
    path.write_text(text + ('{"type": "example", "meth' if cut_short else ""))


def test_results_are_read_from_output_and_rank_files_and_merged_into_output(tmp_path):
    path = tmp_path / "run.jsonl"
    examples = examples_of(4)
    runs = [MethodRun("full", None), MethodRun("d3", 0.9)]
    records = [example_record(run.key, example) for run in runs for example in examples]
    run_line = {"type": "run", **IDENTITY}
    write_lines(path, [run_line, records[0]])  # a one-process session, then a killed two-process one
    write_lines(rank_file(path, 0, 2), [{**run_line, "rank": 0, "processes": 2}, records[0], records[2]],
                cut_short=True)
    write_lines(rank_file(path, 1, 2), [{**run_line, "rank": 1, "processes": 2}, records[1]])
    (tmp_path / "run.jsonl.rank-x-of-2").write_text("not a rank file")
    assert rank_files(path) == [rank_file(path, 0, 2), rank_file(path, 1, 2)]
    with pytest.raises(UserError, match=r"run.jsonl already holds results: add --resume"):
        ResultsFile(path, IDENTITY, resume=False)
    path.unlink()
    with pytest.raises(UserError, match=r"rank-0-of-2 holds results of a data-parallel run: add --resume"):
        ResultsFile(path, IDENTITY, resume=False)
    with pytest.raises(UserError, match="decode differ"):
        ResultsFile(path, {**IDENTITY, "decode": {"max_new_tokens": 16}}, resume=True, start=False)
    write_lines(path, [run_line, records[0]])

    results = ResultsFile(path, IDENTITY, resume=True, start=False)
    assert results.records == [records[0], records[2], records[1]]  # read once each, the cut-short line skipped
    assert results.handle is None and not path.with_name("run.jsonl.rank-2-of-3").exists()
    results.start(rank_file(path, 2, 3), rank=2, processes=3)  # a resumed run in three processes
    results.add(records[3])
    results.close()
    results.extend(records[4:])  # what the other two processes wrote
    results.merge(runs, examples, size=3)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line.get("processes") for line in lines if line["type"] == "run"] == [None, 2, 2, 3]
    assert "rank" not in lines[3]  # this session's line stands for all its processes
    assert [line for line in lines if line["type"] == "example"] == records
    assert rank_files(path) == [] and (tmp_path / "run.jsonl.rank-x-of-2").exists()


def test_a_journal_cut_short_by_a_kill_is_mended_before_appending(tmp_path):
    path = tmp_path / "run.jsonl"
    example = examples_of(1)[0]
    write_lines(rank_file(path, 0, 2), [{"type": "run", **IDENTITY}, example_record("full", example)],
                cut_short=True)
    results = ResultsFile(path, IDENTITY, resume=True, start=False)
    results.start(rank_file(path, 0, 2), rank=0, processes=2)
    results.close()
    lines = [json.loads(line) for line in rank_file(path, 0, 2).read_text().splitlines()]
    assert [line["type"] for line in lines] == ["run", "example", "run"]


def test_a_prompts_digest_tells_its_text_and_its_form_apart(tmp_path):
    raw, chat = Example("e0", "What is 2 + 2?", "4"), Example("e0", "What is 2 + 2?", "4", chat=True)
    assert re.fullmatch(r"[0-9a-f]{16}", prompt_digest(raw))
    assert prompt_digest(raw) == prompt_digest(Example("other id", "What is 2 + 2?", "5"))  # the prompt, not the id
    assert len({prompt_digest(raw), prompt_digest(chat), prompt_digest(Example("e0", "What is 2 + 3?", "5"))}) == 3
    results = ResultsFile(tmp_path / "run.jsonl", IDENTITY, resume=False)
    results.add(example_record("full", raw))
    results.add(example_record("d3@0.9", raw))
    results.close()
    assert list(results.done("full", [raw])) == ["e0"]
    assert results.done("full", [chat]) == {}  # the same id asked another way is not done
    assert results.done("static@0.9", [raw]) == {}
