#!/usr/bin/env bash
# Issue 19's measurements on the embedded SmolLM2-135M-Instruct (int4 weights, d3's kernels), 2 vCPUs.
set -euo pipefail
cd "$(dirname "$0")"
# The schedule the bundled calibration chooses (53 s): bundled-schedule-choice.json is its "schedule" record.
d3 calibrate --schedule-only -o /tmp/bundled.safetensors --json > /tmp/bundled.json
# The same search without a calibration (middle order, no bridges): uncalibrated-schedule-choice.json.
python - <<'PY'
import json
from d3cli.core.model.loader import load
from d3cli.core.session.settings import DecodeSettings
from d3cli.evaluation.builtin_prompts import held_out_prompts
from d3cli.evaluation.calibrate.schedule_choice import Budget, choose_schedule
choice = choose_schedule(load(None), DecodeSettings(skip_order="middle", bridges=False), held_out_prompts(12),
                         Budget(0.15), 128, 12)
json.dump(choice.as_dict(), open("uncalibrated-schedule-choice.json", "w"), indent=1)
PY
# The old defaults on 12 everyday prompts, every method (about 2 minutes).
d3 bench --task replies --alpha 0.98 --min-layers 25 --json -o old-defaults-examples.jsonl > old-defaults-summary.json
