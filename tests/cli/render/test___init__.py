"""The render package hands out every view by name and imports a view's module (and Rich) only when it is asked
for."""

import subprocess
import sys

import pytest

from d3cli.cli import render


def test_every_name_comes_from_the_module_the_table_names():
    import importlib

    for name, module in render.VIEWS.items():
        assert getattr(render, name) is getattr(importlib.import_module(f"d3cli.cli.render.{module}"), name)
    assert set(render.VIEWS) <= set(dir(render))
    with pytest.raises(AttributeError, match="no attribute 'print_nothing'"):
        render.print_nothing


def test_plain_writes_import_no_rich_and_a_view_does():
    program = ("import sys; from d3cli.cli import render; render.write_stdout('x'); render.print_warning('y'); "
               "plain = 'rich' in sys.modules; render.stdout_console(); print(plain, 'rich' in sys.modules)")
    found = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert found.stdout == "xFalse True\n"
