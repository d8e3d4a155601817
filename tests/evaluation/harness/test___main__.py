"""`python -m d3cli.evaluation.harness` (evaluation/harness/__main__.py): lm-eval's own command line with the model d3,
on task YAMLs pointed at local files, in one process and data-parallel under `accelerate launch`; a bad model
argument or a missing lm-eval is one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

OFFLINE = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


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


def test_without_lm_eval_the_command_says_what_to_install(monkeypatch, capsys):
    from d3cli.evaluation.harness.__main__ import main

    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)  # `from lm_eval.__main__ import ...` fails
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    assert capsys.readouterr().err == ("d3: error: lm-eval is not installed (lm_eval.__main__): "
                                       "pip install 'd3cli[eval]'\n")


def test_a_user_error_inside_lm_eval_is_d3s_one_line(monkeypatch, capsys):
    import lm_eval.__main__

    from d3cli.base.errors import UserError
    from d3cli.evaluation.harness.__main__ import main

    def failing():
        raise UserError("alpha must lie in (0, 1], not 2")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", failing)
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2 and capsys.readouterr().err == "d3: error: alpha must lie in (0, 1], not 2\n"
