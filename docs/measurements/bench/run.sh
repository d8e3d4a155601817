#!/bin/bash
# The bench report runs on the embedded model. Needs D3_DATA_DIR. Add --resume after an interruption.
set -euo pipefail
# issue 4 (before bridges): the defaults of then (α 0.98, floor 24, middle order, no bridges), batch 1, 2 CPU cores
#   d3 bench --task gsm8k --limit 50 -o gsm8k.jsonl --json > gsm8k.json
#   d3 bench --task bbh --limit 5 -o bbh.jsonl --json > bbh.json
# issue 11 (bridges): today's defaults (α 0.98, floor 25, importance order and bridges from the bundled calibration),
# d3 and static also without bridges; run in float32 on a lent H100. Full depth checked against the CPU:
#   d3 bench --task gsm8k --limit 50 --batch-size 8 --methods full -o gsm8k-full-cpu.jsonl   (same text, 50 of 50)
time d3 bench --task gsm8k --limit 50 --batch-size 8 --dtype float32 -o gsm8k-bridges.jsonl --json > gsm8k-bridges.json
time d3 bench --task bbh --limit 5 --batch-size 16 --dtype float32 -o bbh-bridges.jsonl --json > bbh-bridges.json
