"""`d3 bench`: methods and their matching, the results file and --resume (through a SIGKILL), the summary."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from conftest import d3_executable

from d3cli.base.errors import UserError
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.evaluation.bench import (
    DEFAULT_METHODS,
    MethodRun,
    ResultsFile,
    default_methods,
    matched_linear,
    matched_static,
    method_runs,
    summarize,
)
from d3cli.evaluation.tasks.base import Example

TINY = ["--min-layers", "3", "--head", "1", "--tail", "1"]
TIMING_KEYS = {"tokens_per_s", "seconds_per_example", "measured_speedup", "decode_tokens_per_s", "decode_speedup"}


def test_methods_run_full_first_then_d3_then_the_baselines():
    runs = method_runs(("full", "d3", "static", "linear"), (0.98, 0.9))
    assert [run.key for run in runs] == ["full", "d3@0.98", "d3@0.9", "static@0.98", "linear@0.98", "static@0.9",
                                         "linear@0.9"]
    assert [run.key for run in method_runs(("full", "d3"), (0.9,))] == ["full", "d3@0.9"]
    assert [run.key for run in method_runs(("full", "d3", "static"), (1.0,))] == ["full"]  # α 1 is full depth
    with pytest.raises(UserError, match="add d3"):
        method_runs(("full", "static"), (0.9,))
    with pytest.raises(UserError, match="unknown method"):
        method_runs(("full", "early-exit"), (0.9,))


def test_bridged_methods_run_beside_the_plain_ones_and_match_their_own_d3():
    runs = method_runs(DEFAULT_METHODS, (0.98,))
    assert [run.key for run in runs] == ["full", "d3@0.98", "d3+bridges@0.98", "static@0.98",
                                         "static+bridges@0.98", "linear@0.98"]
    assert [run.label for run in runs][2] == "d3+bridges α=0.98"
    with pytest.raises(UserError, match=r"static\+bridges is matched to a d3\+bridges run"):
        method_runs(("full", "d3", "static+bridges"), (0.9,))
    plain = DecaySchedule.build(8, alpha=0.9, min_layers=3, head=1, tail=1)
    assert default_methods(plain) == ("full", "d3", "static", "linear")
    assert default_methods(plain.with_bridge_maps({(3, 4): object()})) == DEFAULT_METHODS


def records_for(schedule, lengths):
    return [{"tokens": n, "layers": [schedule.layers_at(i) for i in range(n)]} for n in lengths]


@pytest.mark.parametrize("alpha", [0.9, 0.95, 0.98])
def test_baselines_match_the_d3_runs_mean_depth(alpha):
    d3 = DecaySchedule.build(30, alpha=alpha, min_layers=12, head=2, tail=2)
    lengths = [40, 120, 7, 256, 64]
    records = records_for(d3, lengths)
    target = sum(sum(r["layers"]) for r in records) / sum(lengths)
    static = matched_static(d3, records)
    linear = matched_linear(d3, records)
    for baseline, tolerance in ((static, 0.5), (linear, 0.05)):
        achieved = sum(sum(r["layers"]) for r in records_for(baseline, lengths)) / sum(lengths)
        assert abs(achieved - target) <= tolerance, (baseline.method, achieved, target)
    assert static.layers_at(0) == 30 and len({static.layers_at(i) for i in range(1, 50)}) == 1
    depths = [linear.layers_at(i) for i in range(300)]
    assert depths[0] == 30 and depths == sorted(depths, reverse=True) and depths[-1] >= 4
    assert set(static.kept_layers(5)) <= set(static.kept_layers(1))  # same skip order, nested


def record(method, example_id, correct, flexible, tokens=10, layers=30, seconds=1.0, batch=None, prefill=0.1):
    return {"type": "example", "method": method, "id": example_id, "prompt_sha256": _digest(example_id),
            "correct": correct, "correct_flexible": correct, "flexible": flexible, "tokens": tokens,
            "layers": [layers] * tokens, "seconds": seconds, "first_token_seconds": prefill,
            "batch": batch or f"{method}/{example_id}"}


def _digest(example_id):
    from d3cli.evaluation.bench import prompt_digest

    return prompt_digest(Example(example_id, f"prompt {example_id}", "1"))


def test_summary_accuracy_agreement_delta_and_speed():
    examples = [Example(f"e{i}", f"prompt e{i}", "1") for i in range(4)]
    runs = [MethodRun("full", None), MethodRun("d3", 0.9)]
    records = [record("full", f"e{i}", i < 2, str(i), seconds=2.0) for i in range(4)]
    records += [record("d3@0.9", "e0", True, "0", layers=20, seconds=1.0, batch="b"),
                record("d3@0.9", "e1", False, "9", layers=20, seconds=1.5, batch="b"),  # one batch: 1.5 s wall
                record("d3@0.9", "e2", False, "2", layers=20, seconds=1.0),
                record("d3@0.9", "e3", True, "3", layers=20, seconds=1.0)]
    full, d3 = summarize(records, runs, examples, num_layers=30)
    assert (full["accuracy"], full["agreement"], full["measured_speedup"]) == (0.5, 1.0, 1.0)
    assert (d3["accuracy"], d3["delta_points"], d3["agreement"]) == (0.5, 0.0, 0.75)
    assert d3["mean_layers"] == 20 and d3["layer_ratio"] == pytest.approx(0.6667, abs=1e-4)
    assert d3["tokens_per_s"] == pytest.approx(40 / 3.5, abs=1e-3) and full["tokens_per_s"] == 5.0
    assert d3["measured_speedup"] == pytest.approx(40 / 3.5 / 5.0, abs=1e-3)
    # without the prefills: full decodes 36 tokens in 4 x (2.0 - 0.1) s; d3 decodes 36 in 3.5 - 3 x 0.1 s
    assert full["decode_tokens_per_s"] == pytest.approx(36 / 7.6, abs=1e-3)
    assert d3["decode_tokens_per_s"] == pytest.approx(36 / 3.2, abs=1e-3)
    assert d3["decode_speedup"] == pytest.approx((36 / 3.2) / (36 / 7.6), abs=1e-2)


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


def bench_args(model_dir, data, output, *extra):
    return ["bench", "--task", "gsm8k", "--limit", "6", "--model", str(model_dir), "--data-dir", str(data),
            "-n", "12", "--alpha", "0.8", "--shots", "2", "--output", str(output), *TINY, *extra]


def test_bench_summary_json_and_per_example_records(cli, tiny_model_dir, shared_data, tmp_path):
    output = tmp_path / "gsm8k.jsonl"
    result = cli([*bench_args(tiny_model_dir, shared_data, output, "--json"), "--limit", "3"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {"task", "model", "examples", "methods"} <= summary.keys() and summary["examples"] == 3
    assert [m["name"] for m in summary["methods"]] == ["full", "d3", "static", "linear"]
    for method in summary["methods"]:
        assert {"name", "alpha", "accuracy", "accuracy_flexible", "delta_points", "agreement", "mean_layers",
                "layer_ratio", "generated_tokens", "tokens_per_s", "seconds_per_example",
                "measured_speedup", "repetition", "delta_repetition", "loops"} <= method.keys()
    full, d3 = summary["methods"][0], summary["methods"][1]
    assert full["mean_layers"] == 8 and full["agreement"] == 1.0 and d3["mean_layers"] < 8
    assert full["loops"] == 0 and full["delta_repetition"] == 0 and 0 <= d3["repetition"] <= 1  # GSM8K: repetition too
    assert "d3 bench" in result.stderr  # the table goes to stderr with --json
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert records[0]["type"] == "run"
    examples = [r for r in records if r["type"] == "example"]
    assert len(examples) == 12
    assert {"id", "method", "prompt_sha256", "output", "strict", "flexible", "gold", "correct", "tokens", "layers",
            "seconds"} <= examples[0].keys()


def test_bench_on_bbh_subtasks(cli, tiny_model_dir, shared_data, tmp_path):
    output = tmp_path / "bbh.jsonl"
    args = ["bench", "--task", "bbh", "--subtasks", "navigate,object_counting", "--limit", "2", "--model",
            str(tiny_model_dir), "--data-dir", str(shared_data), "-n", "6", "--methods", "d3", "--shots", "1", "--output",
            str(output), "--json", "--alpha", "0.9", *TINY]
    result = cli(args)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["examples"] == 4 and [m["name"] for m in summary["methods"]] == ["full", "d3"]
    assert set(summary["by_subtask"]["full"]) == {"navigate", "object_counting"}


def comparable(summary: dict) -> list[dict]:
    return [{key: value for key, value in method.items() if key not in TIMING_KEYS} for method in summary["methods"]]


def test_a_killed_bench_resumes_to_the_same_summary(cli, tiny_model_dir, shared_data, tmp_path):
    straight = tmp_path / "straight.jsonl"
    uninterrupted = cli(bench_args(tiny_model_dir, shared_data, straight, "--json"))  # the reference, in this process
    assert uninterrupted.exit_code == 0, uninterrupted.stderr
    killed = tmp_path / "killed.jsonl"
    process = subprocess.Popen([d3_executable(), *bench_args(tiny_model_dir, shared_data, killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it in the middle: once 12 of its 24 examples are written
        if killed.exists() and killed.read_text().count('"type": "example"') >= 12:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = killed.read_text().count('"type": "example"')
    assert 0 < partial < 24, "the bench must be killed part-way"
    resumed = subprocess.run([d3_executable(), *bench_args(tiny_model_dir, shared_data, killed, "--resume", "--json")],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(json.loads(resumed.stdout)) == comparable(json.loads(uninterrupted.stdout))
    ids = [(r["method"], r["id"]) for r in map(json.loads, killed.read_text().splitlines()) if r["type"] == "example"]
    assert len(ids) == len(set(ids)) == 24  # nothing redone, nothing lost


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--task", "mmlu"], "unknown task 'mmlu'"),
        (["--task", "bbh", "--subtasks", "navigat"], "did you mean 'navigate'"),
        (["--limit", "0"], "--limit"),
        (["--alpha", "0.9,fast"], "--alpha takes numbers"),
        (["--alpha", "0.9,1.5"], "(0, 1]"),
        (["--methods", "d3,magic"], "unknown method 'magic'"),
        (["--methods", "d3,linear+bridges"], "add d3+bridges"),
        (["--shots", "12"], "0 to 8 shots"),
    ],
)
def test_bad_bench_options_are_one_line(cli, shared_data, args, fragment):
    result = cli(["bench", "--data-dir", str(shared_data), *args])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.count("\n") == 1 and fragment in result.stderr


def test_missing_or_malformed_data_is_one_line(cli, tmp_path, shared_data):
    result = cli(["bench", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "gsm8k/test.jsonl" in result.stderr and result.stderr.count("\n") == 1
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    (tmp_path / "gsm8k" / "train.jsonl").write_bytes((shared_data / "gsm8k" / "train.jsonl").read_bytes())
    result = cli(["bench", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "test.jsonl:2: not valid JSON" in result.stderr


def test_bench_runs_bridged_methods_with_a_calibration(cli, tiny_model_dir, shared_data, tmp_path):
    from calibration_files import calibration_file, identity_of

    path = calibration_file(tmp_path, identity_of(tiny_model_dir))
    output = tmp_path / "gsm8k.jsonl"
    result = cli([*bench_args(tiny_model_dir, shared_data, output, "--json"), "--limit", "2", "--alpha", "0.9",
                  "--calibration", path, "--methods", "d3,d3+bridges,static,static+bridges"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["calibration"] == path and summary["skip_order"] == "importance"
    rows = {row["name"]: row for row in summary["methods"]}
    assert list(rows) == ["full", "d3", "d3+bridges", "static", "static+bridges"]
    assert rows["d3+bridges"]["bridges"] is True and rows["d3"]["bridges"] is False
    assert rows["static+bridges"]["method"] == "static"
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert records[0]["calibration"] == path
    without = cli(["bench", "--task", "gsm8k", "--model", str(tiny_model_dir), "--data-dir", str(shared_data),
                   "--output", str(tmp_path / "plain.jsonl"), "--limit", "1", "--alpha", "0.9", *TINY,
                   "--methods", "d3+bridges"])
    assert without.exit_code == 2 and "needs bridges" in without.stderr


def test_bench_replies_reports_free_running_fidelity_per_method(cli, tiny_model_dir, tmp_path):
    output = tmp_path / "replies.jsonl"
    result = cli(["bench", "--task", "replies", "--model", str(tiny_model_dir), "--alpha", "0.7", "--min-layers", "3",
                  "--head", "1", "--tail", "1", "-n", "16", "--limit", "3", "--methods", "d3,linear", "--json",
                  "-o", str(output)])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["task"] == "replies" and summary["schedule_source"] == "option"
    rows = {row["method"]: row for row in summary["methods"]}
    assert set(rows) == {"full", "d3", "linear"}
    full, d3 = rows["full"], rows["d3"]
    assert full["delta_repetition"] == 0 and full["loops"] == 0 and full["delta_nll"] == 0
    assert d3["mean_layers"] < 8 and d3["loops"] <= 3 and d3["worst_delta_repetition"] >= d3["delta_repetition"]
    assert d3["delta_nll"] is not None and "repetition" in d3 and "median_first_difference" in d3
    records = [json.loads(line) for line in output.read_text().splitlines()]
    examples = [record for record in records if record.get("type") == "example"]
    assert len(examples) == 9 and all("token_ids" in record and "repetition" in record for record in examples)
    assert "loops" in result.stderr and "ΔNLL" in result.stderr


def test_bench_at_a_full_depth_schedule_runs_full_depth_only_and_says_so(cli, tiny_model_dir, tmp_path):
    result = cli(["bench", "--task", "replies", "--model", str(tiny_model_dir), "--alpha", "1", "-n", "8",
                  "--limit", "2", "--json", "-o", str(tmp_path / "r.jsonl")])
    assert result.exit_code == 0, result.stderr
    assert [row["method"] for row in json.loads(result.stdout)["methods"]] == ["full"]
    assert "only full depth ran" in " ".join(result.stderr.split())
