"""evaluation/calibrate/defaults.py: the defaults `d3 calibrate --help` shows are the ones a calibration uses, from a
module that imports nothing."""

from __future__ import annotations

import subprocess
import sys

from d3cli.evaluation.calibrate import defaults, schedule_choice
from d3cli.evaluation.calibrate.options import CalibrationOptions


def test_the_options_and_the_schedule_search_use_these_defaults():
    options = CalibrationOptions()
    assert (options.budget, options.schedule_tokens) == (defaults.DEFAULT_NLL_BUDGET, defaults.SCHEDULE_TOKENS)
    assert schedule_choice.Budget().nll == defaults.DEFAULT_NLL_BUDGET


def test_calibrate_help_shows_them(cli):
    shown = cli(["calibrate", "--help"]).stdout
    budget = shown[shown.index("--budget"):].split("[default:", 1)[1].split("]", 1)[0]
    tokens = shown[shown.index("--schedule-tokens"):].split("[default:", 1)[1].split("]", 1)[0]
    assert float(budget) == defaults.DEFAULT_NLL_BUDGET and int(tokens) == defaults.SCHEDULE_TOKENS


def test_importing_them_imports_nothing_else_of_d3():
    loaded = subprocess.run([sys.executable, "-c", "import sys, d3cli.evaluation.calibrate.defaults; print(sorted(m "
                             "for m in sys.modules if m.startswith(('d3cli.core', 'torch'))))"],
                            capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
