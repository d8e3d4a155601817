#!/bin/bash
# The runs behind docs/PROFILE.md (embedded SmolLM2-135M-Instruct, 2 CPU cores, float32). Needs D3_DATA_DIR.
set -euo pipefail
d3 profile-ppl --limit 32 --alpha 0.98,0.95 --save-profile layers.json --csv profile.csv --plot profile.png \
    --json > profile.json
d3 profile-ppl --limit 32 --alpha 0.98,0.95 --skip-order importance --profile layers.json --json \
    > profile_importance.json
for order in middle importance late; do  # held out: texts 32-63, which the layer profile never saw
    extra=(); [ "$order" = importance ] && extra=(--profile layers.json)
    d3 profile-ppl --offset 32 --limit 32 --alpha 0.98,0.95,0.9 --skip-order "$order" "${extra[@]}" --json \
        > "heldout_$order.json"
done
d3 profile-ppl --offset 64 --limit 16 --target-speedup 1.15 --reply-tokens 128 --json > calibration.json
