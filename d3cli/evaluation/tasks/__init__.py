"""The benchmark task registry: `d3 bench --task NAME` looks tasks up here."""

from __future__ import annotations

from pathlib import Path

from d3cli.base.errors import UserError
from d3cli.evaluation.tasks.bbh import BbhTask
from d3cli.evaluation.tasks.gsm8k import Gsm8kTask
from d3cli.evaluation.tasks.replies import RepliesTask

TASKS = {"gsm8k": Gsm8kTask, "bbh": BbhTask, "replies": RepliesTask}


def get_task(name: str):
    from d3cli.core.session.settings import did_you_mean

    if name not in TASKS:
        raise UserError(f"unknown task {name!r}{did_you_mean(name, TASKS)} (choose from: {', '.join(TASKS)})")
    return TASKS[name]()


def task_examples(task, options, data_dir_option=None, on_download=None) -> tuple[list, Path]:
    """The examples of `task` (a task object) that `options` select, from the data folder (`--data-dir`,
    $D3_DATA_DIR, or the download cache, fetching missing files there when it can), and that folder."""
    from d3cli.evaluation.tasks.datasets import data_dir, require

    folder, downloadable = data_dir(data_dir_option)
    require(folder, task.files(options), downloadable,
            on_download=None if on_download is None else lambda name: on_download(name, folder))
    return task.examples(folder, options), folder
