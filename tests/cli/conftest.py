"""Fixtures of the CLI's tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def user_file(monkeypatch, tmp_path) -> Path:
    folder = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(folder))
    (folder / "d3").mkdir(parents=True)
    return folder / "d3" / "config.toml"
