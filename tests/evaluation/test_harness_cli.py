"""lm-eval through d3: `d3 bench --task lm-eval:...`, lm-eval's own command line with the model d3
(`python -m d3cli.evaluation.harness`), task YAMLs pointed at local files, and data-parallel runs under
`accelerate launch`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

TINY_SCHEDULE = ["--alpha", "0.8", "--min-layers", "3", "--head", "1", "--tail", "1"]
OFFLINE = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def test_bench_runs_lm_eval_tasks_side_by_side(cli, tiny_model_dir, shared_data, tmp_path):
    output = tmp_path / "summary.json"
    result = cli(["bench", "--task", "lm-eval:gsm8k_cot,bbh_mc_navigate", "--model", str(tiny_model_dir),
                  "--data-dir", str(shared_data), "--limit", "3", "-n", "12", *TINY_SCHEDULE,
                  "--methods", "d3,static", "--json", "-o", str(output)])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == json.loads(output.read_text()) | {"output": str(output)}
    assert summary["documents"] == {"gsm8k_cot": 3, "bbh_mc_navigate": 3}
    rows = {row["name"]: row for row in summary["methods"]}
    assert list(rows) == ["full", "d3", "static"]
    assert set(rows["full"]["metrics"]["gsm8k_cot"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert set(rows["full"]["metrics"]["bbh_mc_navigate"]) == {"acc,none"}
    assert rows["full"]["mean_layers"] == 8 and rows["d3"]["mean_layers"] < 8
    assert abs(rows["static"]["mean_layers"] - rows["d3"]["mean_layers"]) < 1  # matched to D3's mean depth
    assert rows["full"]["agreement"] == {"gsm8k_cot": 1.0, "bbh_mc_navigate": 1.0}
    assert rows["d3"]["delta"]["bbh_mc_navigate"]["acc,none"] == pytest.approx(
        rows["d3"]["metrics"]["bbh_mc_navigate"]["acc,none"] - rows["full"]["metrics"]["bbh_mc_navigate"]["acc,none"])
    assert "task · metric" in result.stderr  # the table goes to stderr with --json


@pytest.mark.parametrize(("args", "message"), [
    (["--task", "lm-eval:"], "needs task names"),
    (["--task", "lm-eval:gsm8k_cot", "--resume"], "--resume apply to d3's own tasks"),
    (["--task", "gsm8k", "--include-path", "."], "--include-path applies to --task lm-eval"),
    (["--task", "lm-eval:no_such_task", "--limit", "1"], "lm-eval could not run no_such_task"),
    (["--task", "lm-eval:gsm8k_cot", "--temperature", "0.7"], "an lm-eval task samples as its generation_kwargs"),
])
def test_bad_lm_eval_benches_are_one_line(cli, tiny_model_dir, shared_data, args, message):
    result = cli(["bench", "--model", str(tiny_model_dir), "--data-dir", str(shared_data), *args])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def harness(args: list[str], processes: int, tmp_path: Path) -> subprocess.CompletedProcess:
    return harness_result(start_harness(args, processes, tmp_path))


def harness_result(process: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=240)
    finally:
        process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def start_harness(args: list[str], processes: int, tmp_path: Path) -> subprocess.Popen:
    launcher = []
    if processes > 1:
        with socket.socket() as probe:  # a free loopback port for the processes to meet on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        # --multi_gpu, not --cpu: accelerate's --cpu starts one process without an MPI hostfile; on a machine
        # without GPUs --multi_gpu starts the processes through torch.distributed and they meet over gloo
        launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                    str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    command = [*launcher, "-m", "d3cli.evaluation.harness"] if launcher else [sys.executable, "-m",
                                                                              "d3cli.evaluation.harness"]
    return subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=OFFLINE)


def rounded(value):
    """A sample's responses with every number written as text rounded to 5 significant digits."""
    if isinstance(value, (list, tuple)):
        return [rounded(item) for item in value]
    try:
        return f"{float(value):.5g}"
    except (TypeError, ValueError):
        return value


def samples(folder: Path) -> dict:
    found = {}
    for path in folder.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            found[(task, sample["doc_id"])] = (sample["filtered_resps"], sample["resps"])
    return found


def test_lm_eval_runs_model_d3_on_local_yamls_in_one_and_in_two_processes(tiny_model_dir, shared_data, tmp_path):
    from d3cli.evaluation.harness.local_tasks import main as write_yamls

    tasks = tmp_path / "tasks"
    assert write_yamls(["gsm8k_cot", "bbh_mc_navigate", "--data-dir", str(shared_data), "--output", str(tasks)]) == 0
    assert sorted(path.name for path in tasks.iterdir()) == ["bbh_mc_navigate_local.yaml", "gsm8k_cot_local.yaml"]
    args = ["--model", "d3", "--model_args", f"pretrained={tiny_model_dir},alpha=0.8,min_layers=3,head=1,tail=1",
            "--tasks", "gsm8k_cot_local,bbh_mc_navigate_local", "--include_path", str(tasks), "--limit", "6",
            "--gen_kwargs", "max_gen_toks=12", "--log_samples"]
    # both runs at once: each spends most of its time starting up (imports, lm-eval's task index), not decoding
    started = {name: start_harness([*args, "--output_path", str(tmp_path / name)], processes, tmp_path)
               for name, processes in (("one", 1), ("two", 2))}
    try:
        one, two = harness_result(started["one"]), harness_result(started["two"])
    finally:
        for process in started.values():
            process.kill()
    assert one.returncode == 0, one.stderr[-3000:]
    assert "process 1 of 1: 6 generate_until requests" in one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    assert "process 1 of 2: 3 generate_until requests" in two.stderr
    assert "process 2 of 2: 3 generate_until requests" in two.stderr
    single, parallel = samples(tmp_path / "one"), samples(tmp_path / "two")
    # greedy: the same answers, however the documents are shared; log-likelihoods to float rounding (a context's
    # last token is scored alone in one process and beside others in the other: the same sums, other kernels)
    assert len(single) == 12 and single.keys() == parallel.keys()
    assert all(rounded(single[key]) == rounded(parallel[key]) for key in single)


def test_a_bad_model_argument_is_one_line(tiny_model_dir, tmp_path):
    result = harness(["--model", "d3", "--model_args", f"pretrained={tiny_model_dir},alpha=2", "--tasks",
                      "gsm8k_cot"], 1, tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == \
        "d3: error: alpha must lie in (0, 1], not 2"
