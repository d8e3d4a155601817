"""The benchmark task registry: `d3 bench --task NAME` looks tasks up here."""

from __future__ import annotations

from d3cli.core.errors import UserError
from d3cli.evaluation.tasks.bbh import BbhTask
from d3cli.evaluation.tasks.gsm8k import Gsm8kTask

TASKS = {"gsm8k": Gsm8kTask, "bbh": BbhTask}


def get_task(name: str):
    from d3cli.core.settings import did_you_mean

    if name not in TASKS:
        raise UserError(f"unknown task {name!r}{did_you_mean(name, TASKS)} (choose from: {', '.join(TASKS)})")
    return TASKS[name]()
