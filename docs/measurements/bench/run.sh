#!/bin/bash
# The issue-4 report runs: embedded model, defaults, batch 1, 2 CPU cores. Needs D3_DATA_DIR.
set -euo pipefail
time d3 bench --task gsm8k --limit 50 -o gsm8k.jsonl --json > gsm8k.json
time d3 bench --task bbh --limit 5 -o bbh.jsonl --json > bbh.json   # add --resume after an interruption
