"""Evaluation: what d3 measures about a model, each job its own package. Imports the core, never the cli or the
server.

    builtin_prompts.py  d3's own prompts (calibration, held out, replies) and their encoding
    scoring.py          teacher-forced scoring of a text under a plan (shared by profile, calibrate, lm-eval)
    fidelity.py         a D3 reply against the full-depth one (shared by bench and calibrate)
    timing.py           per-step cost T(k) = T_fixed + k·T_layer (shared by speed and profile)
    tasks/              benchmark tasks (gsm8k, bbh, replies) and their data
    bench/              `d3 bench --task gsm8k|bbh|replies`: methods, results file, summary, runner, data-parallel
    speed/              `d3 bench --task speed`
    profile/            `d3 profile-ppl`
    calibrate/          `d3 calibrate`
    harness/            the lm-evaluation-harness model and its local tasks
"""
