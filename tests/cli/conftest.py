"""Fixtures of the CLI's tests."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest


@pytest.fixture
def user_file(monkeypatch, tmp_path) -> Path:
    folder = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(folder))
    (folder / "d3").mkdir(parents=True)
    return folder / "d3" / "config.toml"


# The modules a command imports when it runs: imported before `nothing_loads` patches the loader, so that none of
# them binds the refusing stand-in at its first import and keeps it for the tests after this one.
COMMAND_MODULES = ("d3cli.core.session.front_door", "d3cli.evaluation.bench.runner", "d3cli.evaluation.speed.report",
                   "d3cli.evaluation.calibrate.run", "d3cli.evaluation.calibrate.estimate",
                   "d3cli.evaluation.profile.run")


@pytest.fixture
def nothing_loads(monkeypatch):
    """A model load fails the test: each mistake the test makes is found before any model loads."""
    for module in COMMAND_MODULES:
        importlib.import_module(module)

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("d3cli.core.session.front_door.open_model", refuse)
    monkeypatch.setattr("d3cli.core.model.loader.load", refuse)
