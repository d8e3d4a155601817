"""The defaults `d3 calibrate --help` shows, in a module that imports nothing (the CLI builds its options without
torch); schedule_choice.py and options.py use them."""

DEFAULT_NLL_BUDGET = 0.10  # nats/token: docs/DEFAULTS.md has the measurements behind it
SCHEDULE_TOKENS = 128  # most tokens per reply of the schedule stage
