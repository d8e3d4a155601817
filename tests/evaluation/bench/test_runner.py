"""A `d3 bench` run (evaluation/bench/runner.py) through the CLI: the summary and the per-example records, BBH
subtasks, --resume after a SIGKILL, bridged methods with a calibration, the replies task's fidelity columns, and a
full-depth schedule."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from conftest import d3_executable

TINY = ["--min-layers", "3", "--head", "1", "--tail", "1"]
TIMING_KEYS = {"tokens_per_s", "seconds_per_example", "measured_speedup", "decode_tokens_per_s", "decode_speedup"}


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
