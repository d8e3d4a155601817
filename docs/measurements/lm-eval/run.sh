#!/bin/sh
# lm-eval through d3 on the embedded model (SmolLM2-135M-Instruct, CPU, float32, d3's defaults: α 0.98, floor 0.84,
# the bundled calibration's importance order and bridges). Run from the repository root.
set -e
DATA=${D3_DATA_DIR:-../shared/data}
OUT=docs/measurements/lm-eval
# multiple choice (log-likelihood of each answer) and whole-document log-likelihood
.venv/bin/d3 bench --task lm-eval:bbh_mc_boolean_expressions,bbh_mc_causal_judgement,bbh_mc_formal_fallacies,bbh_mc_navigate,bbh_mc_sports_understanding,bbh_mc_web_of_lies,gsm8k_solutions_rolling \
    --data-dir "$DATA" --limit 50 --methods d3,d3+bridges -o $OUT/likelihood.json > $OUT/likelihood.txt
# generation: lm-eval's gsm8k_cot (8-shot chain of thought), first 10 test questions
.venv/bin/d3 bench --task lm-eval:gsm8k_cot --data-dir "$DATA" --limit 10 --methods d3,d3+bridges \
    -o $OUT/gsm8k-cot.json > $OUT/gsm8k-cot.txt
# the scoring cross-check on the outputs of the recorded d3 bench runs
.venv/bin/python $OUT/crosscheck.py "$DATA" docs/measurements/bench/gsm8k-bridges.jsonl \
    docs/measurements/bench/bbh-bridges.jsonl > $OUT/crosscheck.json
