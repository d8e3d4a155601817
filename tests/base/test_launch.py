"""base/launch.py: the launch read from the environment alone (joining it: evaluation/bench/test_distributed.py)."""

from __future__ import annotations

import sys

from d3cli.base import launch

LAUNCH_VARIABLES = (*launch.SIZE_VARIABLES, *launch.RANK_VARIABLES, "LOCAL_RANK", "ACCELERATE_USE_CPU",
                    "MASTER_ADDR", "MASTER_PORT")


def test_the_launch_is_read_from_the_environment(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert launch.launched_size() == 2 and launch.secondary_process()
    monkeypatch.setenv("RANK", "0")
    assert not launch.secondary_process()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")  # mpirun, accelerate's own multi-CPU launch
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert launch.launched_size() == 4 and launch.secondary_process()
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.delenv("OMPI_COMM_WORLD_RANK")
    # `accelerate launch --cpu --num_processes 2` without mpirun, or without --multi_gpu and GPUs: one process
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert not launch.single_process_launch()  # --num_processes 1: no main process address
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert launch.single_process_launch()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    assert launch.single_process_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's children: a real launch
    assert not launch.single_process_launch()


def test_a_plain_run_is_no_launch_and_reading_it_imports_nothing_heavy(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert launch.launched_size() == 1 and not launch.secondary_process() and not launch.single_process_launch()
    monkeypatch.setenv("WORLD_SIZE", "two")  # not a number: no launch
    assert launch.launched_size() == 1
    import subprocess

    imported = subprocess.run([sys.executable, "-c", "import sys, d3cli.base.launch; print(sorted(m for m in "
                               "sys.modules if m.split('.')[0] in ('torch', 'accelerate', 'transformers')))"],
                              capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"
