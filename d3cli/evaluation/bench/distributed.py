"""The processes of a data-parallel run: which one this is, how many there are, and the two things they do together.

A run started by `accelerate launch` (torchrun, mpirun) has `WORLD_SIZE` (or an MPI size) above 1 in its
environment; only then is accelerate imported and its `PartialState` made, which joins the process group (gloo on
CPU, NCCL on GPUs, with a timeout so that no process waits forever for one that hangs). A plain run gets
`World()`: rank 0 of 1, no process group, every operation a no-op.

The processes meet only in `all_gather` (each hands in a picklable value and gets everyone's, in rank order) and in
`all_or_none` (a step that may raise UserError on any process ends with the same UserError on every process).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from d3cli.base.errors import UserError
from d3cli.base.launch import RANK_VARIABLES, SIZE_VARIABLES, launched_size, secondary_process, single_process_launch  # noqa: F401 (the launch's facts, here with the world they make)

T = TypeVar("T")

TIMEOUT_S = 1800  # a collective waits at most this long for the other processes (a dead one is noticed at once)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run; `World()` is a plain single-process run."""

    rank: int = 0
    size: int = 1
    gather: Callable[[object], list] | None = None  # everyone's value of a collective, in rank order

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's strided share: items[rank::size]."""
        return list(items[self.rank::self.size])

    def all_gather(self, value: object) -> list:
        """Every process's `value`, in rank order (all processes must call it)."""
        if not self.parallel:
            return [value]
        return self.gather(value)

    @contextmanager
    def all_or_none(self) -> Iterator[None]:
        """Run a step that may fail with a UserError on any process (reading data, loading the model, checking a
        results file). If it fails anywhere, it fails everywhere with the lowest failing rank's message, so that no
        process goes on to wait for one that has stopped; rank 0 prints it (the CLI's edge keeps other ranks quiet)."""
        if not self.parallel:
            yield
            return
        try:
            yield
        except UserError as error:
            problems = self.all_gather(str(error))
            raise UserError(first_problem(problems)) from error
        problems = self.all_gather(None)
        if any(problem is not None for problem in problems):
            raise UserError(first_problem(problems))

    def close(self) -> None:
        """Leave the process group (a plain run has none)."""
        if self.parallel:
            import torch.distributed

            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def first_problem(problems: Sequence[str | None]) -> str:
    """The lowest rank's message, marked with its rank unless it is rank 0's."""
    rank, problem = next((rank, problem) for rank, problem in enumerate(problems) if problem is not None)
    return problem if rank == 0 else f"process {rank}: {problem}"


def current_world(timeout_s: float = TIMEOUT_S) -> World:
    """This process's World: joins the launcher's process group when there is one, else `World()`."""
    if launched_size() <= 1:
        return World()
    import datetime

    import torch
    from accelerate import PartialState

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    state = PartialState(cpu=use_cpu, timeout=datetime.timedelta(seconds=timeout_s))
    if state.num_processes <= 1:
        return World()
    return World(state.process_index, state.num_processes, _all_gather_object)


def _all_gather_object(value: object) -> list:
    import torch.distributed

    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
