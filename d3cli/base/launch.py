"""Whether this process was started by a launcher (accelerate launch, torchrun, mpirun), read from the environment
alone: cheap enough for the CLI's start-up, which silences every process but rank 0's. Joining the launch's process
group is evaluation/bench/distributed.py's job."""

from __future__ import annotations

import os
from collections.abc import Sequence

SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def _int_variable(names: Sequence[str]) -> int | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def launched_size() -> int:
    """How many processes the launcher started, from the environment alone (1 when none did)."""
    return _int_variable(SIZE_VARIABLES) or 1


def secondary_process() -> bool:
    """Whether this is a process other than rank 0 of a launch (environment only: no process group needed)."""
    return launched_size() > 1 and (_int_variable(RANK_VARIABLES) or 0) > 0


def single_process_launch() -> bool:
    """Whether accelerate's simple launcher started this one process for a run of several: it does so for
    `--num_processes N` with `--cpu` but no mpirun, or without `--multi_gpu` on a machine with fewer than 2 GPUs. It
    sets ACCELERATE_USE_CPU always and the main process's address only when N > 1, but no rank or size."""
    return ("ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ
            and _int_variable(SIZE_VARIABLES) is None)
