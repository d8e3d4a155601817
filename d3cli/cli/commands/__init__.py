"""One module per subcommand: parse the options, call one function of core or evaluation, render.

A command imports the core and evaluation inside its function, not at the top: importing the CLI (for `--help`,
shell completion and `d3 config`) must not import torch (tests/cli/test_app.py holds that). Their options, enums
and defaults come from modules that import nothing heavy (cli/options.py, core/model/choices.py,
core/session/settings.py, evaluation/calibrate/defaults.py).
"""
