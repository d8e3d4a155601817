"""Data-parallel `d3 bench` (evaluation/bench/distributed.py): shares, the all-or-none checks, the launch read from
the environment, and real launches whose summary and per-example outputs equal one process's (rank files and their
merge alone: test_results_file.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from d3cli.base.errors import UserError
from d3cli.evaluation.bench import distributed
from d3cli.evaluation.bench.distributed import World
from d3cli.evaluation.bench.results_file import rank_file, rank_files
from evaluation.bench.test_results_file import write_lines

TINY = ["--min-layers", "3", "--head", "1", "--tail", "1"]
TIMING_KEYS = {"tokens_per_s", "seconds_per_example", "measured_speedup", "decode_tokens_per_s", "decode_speedup"}
SAME_IN_EVERY_RUN = ("method", "id", "prompt_sha256", "output", "strict", "flexible", "gold", "correct",
                     "correct_flexible", "tokens", "layers", "finish_reason")
LAUNCH_VARIABLES = (*distributed.SIZE_VARIABLES, *distributed.RANK_VARIABLES, "LOCAL_RANK", "ACCELERATE_USE_CPU",
                    "MASTER_ADDR", "MASTER_PORT")


# --- without processes -------------------------------------------------------------------------------------------

def test_each_process_takes_a_strided_share():
    items = list(range(11))
    shares = [World(rank, 3).share(items) for rank in range(3)]
    assert shares == [items[0::3], items[1::3], items[2::3]]
    assert sorted(sum(shares, [])) == items
    assert World().share(items) == items
    assert World(1, 4).share([0]) == []  # more processes than examples: some get none


def fake_world(rank: int, problems_of_others: dict[int, str | None], size: int = 3) -> World:
    """A world whose all_gather answers with the other ranks' values as given."""
    def gather(value):
        return [value if other == rank else problems_of_others.get(other) for other in range(size)]

    return World(rank, size, gather)


def test_a_check_that_fails_on_one_process_fails_on_every_process_with_its_message():
    with pytest.raises(UserError, match=r"^process 2: no such model$"):  # rank 0 learns why rank 2 stopped
        with fake_world(0, {2: "no such model"}).all_or_none():
            pass
    with pytest.raises(UserError, match=r"^bad file$"):  # the lowest failing rank's message wins
        with fake_world(1, {0: "bad file", 2: "no such model"}).all_or_none():
            raise UserError("its own problem")
    with pytest.raises(UserError, match=r"^process 1: its own problem$"):
        with fake_world(1, {}).all_or_none():
            raise UserError("its own problem")
    with fake_world(2, {}).all_or_none():  # nobody failed: everyone goes on
        pass
    with pytest.raises(UserError, match=r"^as it was$"):  # one process: the error itself, untouched
        with World().all_or_none():
            raise UserError("as it was")


def test_a_plain_run_starts_no_process_group(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "accelerate", None)  # importing accelerate would fail: it must not happen
    assert distributed.launched_size() == 1 and not distributed.secondary_process()
    assert distributed.current_world() == World()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.current_world() == World()


# --- the CLI in this process: resuming what a killed data-parallel run left ------------------------------------

def bench_args(model_dir, data, output, *extra):
    return ["bench", "--task", "gsm8k", "--limit", "6", "--model", str(model_dir), "--data-dir", str(data),
            "-n", "12", "--alpha", "0.8", "--shots", "2", "--output", str(output), "--device", "cpu", "--json",
            *TINY, *extra]


def comparable(summary: dict) -> list[dict]:
    return [{key: value for key, value in method.items() if key not in TIMING_KEYS} for method in summary["methods"]]


def example_lines(path: Path) -> list[dict]:
    return [record for record in map(json.loads, path.read_text().splitlines()) if record["type"] == "example"]


def same_outputs(records: list[dict]) -> list[tuple]:
    return [tuple(record[key] for key in SAME_IN_EVERY_RUN) for record in records]


@pytest.fixture(scope="module")
def one_process_run(tiny_model_dir, shared_data, tmp_path_factory):
    """The reference: the bench in one process, --batch-size 1, 6 examples x full, d3, static, linear."""
    from conftest import invoke

    folder = tmp_path_factory.mktemp("one-process")
    output = folder / "one.jsonl"
    with pytest.MonkeyPatch.context() as patch:  # as the autouse fixtures do for a test: an empty folder, no D3_*
        patch.chdir(folder)
        for variable in [name for name in os.environ if name.startswith("D3_") and name != "D3_CACHE_DIR"]:
            patch.delenv(variable)
        started = time.perf_counter()
        result = invoke(bench_args(tiny_model_dir, shared_data, output))
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout), output, time.perf_counter() - started


def test_one_process_resumes_what_a_killed_two_process_run_left(cli, one_process_run, tiny_model_dir, shared_data,
                                                                tmp_path):
    summary, reference, _ = one_process_run
    records = example_lines(reference)
    run_line = json.loads(reference.read_text().splitlines()[0])
    output = tmp_path / "killed.jsonl"
    # killed part-way: full and d3 finished (each rank its stride), static half done, linear not started
    for rank in range(2):
        kept = [record for record in records if record["method"] in ("full", "d3@0.8")
                or (record["method"] == "static@0.8" and record["id"] in ("gsm8k/0", "gsm8k/1"))]
        mine = [record for record in kept if int(record["id"].split("/")[1]) % 2 == rank]
        write_lines(rank_file(output, rank, 2), [{**run_line, "rank": rank, "processes": 2}, *mine],
                    cut_short=rank == 1)
    resumed = cli(bench_args(tiny_model_dir, shared_data, output, "--resume"))
    assert resumed.exit_code == 0, resumed.stderr
    assert comparable(json.loads(resumed.stdout)) == comparable(summary)
    merged = example_lines(output)
    assert same_outputs(merged) == same_outputs(records)  # everything, once, in one process's order
    assert merged[:12] == records[:12]  # what the killed run finished was kept as it was, not redone
    assert rank_files(output) == []


# --- real processes ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_environment() -> dict:
    environment = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    environment.update(MASTER_ADDR="127.0.0.1", CUDA_VISIBLE_DEVICES="")  # the loopback; gloo on the CPU
    return environment


def accelerate_launch(args: list[str], cwd: Path, processes: int = 2, cpu_flag: str = "--multi_gpu",
                      timeout: int = 240) -> tuple[subprocess.CompletedProcess, float]:
    """`accelerate launch` of `d3 bench ARGS` (-m d3cli). On a machine without mpirun, accelerate starts several CPU
    processes only through its torchrun launcher, which it names --multi_gpu; d3 uses gloo when there is no GPU."""
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", cpu_flag, "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(free_port()), "-m", "d3cli", *args]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                            env=launch_environment())
    return result, time.perf_counter() - started


def test_two_processes_give_the_one_process_summary_and_outputs(one_process_run, tiny_model_dir, shared_data,
                                                                tmp_path):
    summary, reference, one_seconds = one_process_run
    output = tmp_path / "two.jsonl"
    result, two_seconds = accelerate_launch(bench_args(tiny_model_dir, shared_data, output), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("\n") == 1  # rank 0's summary only; the other process prints nothing
    two = json.loads(result.stdout)
    assert comparable(two) == comparable(summary)
    merged = example_lines(output)
    assert same_outputs(merged) == same_outputs(example_lines(reference))  # greedy: identical, same order
    assert {record["batch"].rsplit("/", 1)[1] for record in merged} == {"rank0", "rank1"}
    assert [line.get("processes") for line in map(json.loads, output.read_text().splitlines())
            if line["type"] == "run"] == [2]
    assert rank_files(output) == []
    assert result.stderr.count("d3 bench · gsm8k") == 1  # one table, from rank 0
    print(f"one process {one_seconds:.1f} s in pytest's process; two processes {two_seconds:.1f} s with start-up")


def test_two_processes_resume_a_one_process_file(one_process_run, tiny_model_dir, shared_data, tmp_path):
    summary, reference, _ = one_process_run
    output = tmp_path / "partial.jsonl"
    lines = reference.read_text().splitlines()
    output.write_text("\n".join(lines[:10]) + '\n{"type": "example", "cut')  # 9 examples, then a kill
    result, _ = accelerate_launch(bench_args(tiny_model_dir, shared_data, output, "--resume"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert comparable(json.loads(result.stdout)) == comparable(summary)
    merged = example_lines(output)
    assert same_outputs(merged) == same_outputs(example_lines(reference))
    assert merged[:9] == example_lines(reference)[:9]  # the one-process records, kept as they were
    assert rank_files(output) == []


def test_accelerate_launch_cpu_without_mpirun_runs_one_process_and_says_so(tmp_path):
    result, _ = accelerate_launch(["bench", "--data-dir", str(tmp_path)], tmp_path, cpu_flag="--cpu", timeout=120)
    own = d3_part(result.stderr)
    assert "started a single process" in own
    assert own.count("d3: error:") == 1 and "gsm8k/test.jsonl" in own


def d3_part(stderr: str) -> str:
    """What d3's process wrote, without accelerate's own report of the exit status (accelerate 1.16 raises an error
    that repeats the child's stderr, then its traceback)."""
    lines = stderr.splitlines(keepends=True)
    for number, line in enumerate(lines):
        if line.startswith(("RuntimeError:", "Traceback", "subprocess.CalledProcessError")):
            return "".join(lines[:number])
    return stderr


PEER = textwrap.dedent("""
    import sys, time
    from d3cli.base.errors import UserError
    from d3cli.evaluation.bench.distributed import current_world

    world = current_world(timeout_s=float(sys.argv[1]))
    try:
        with world.all_or_none():
            if world.rank == 1:
                raise UserError("rank 1 cannot read its data")
    except UserError as error:
        print(f"{world.rank}/{world.size}: {error}", flush=True)
    if world.rank == 1:
        time.sleep(60)  # alive, but never meets rank 0 again
    else:
        started = time.monotonic()
        try:
            world.all_gather("anyone there?")
        except Exception as error:
            print(f"gave up after {time.monotonic() - started:.0f} s: {type(error).__name__}", flush=True)
""")


def test_processes_fail_together_and_never_wait_forever(tmp_path):
    script = tmp_path / "peer.py"
    script.write_text(PEER)
    port = free_port()
    peers = []
    for rank in range(2):
        environment = {**launch_environment(), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": str(port)}
        peers.append(subprocess.Popen([sys.executable, str(script), "8"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=environment))
    try:
        main_out, main_err = peers[0].communicate(timeout=120)
    finally:
        peers[1].kill()
    other_out, _ = peers[1].communicate()
    assert "0/2: process 1: rank 1 cannot read its data" in main_out, main_err[-2000:]
    assert "1/2: process 1: rank 1 cannot read its data" in other_out
    assert "gave up after" in main_out, main_err[-2000:]
    assert int(main_out.split("gave up after ")[1].split(" s")[0]) < 40  # the 8 s timeout, not forever
