#!/bin/bash
# How long `d3 calibrate` takes on this project's 2 CPU cores (README's "Time" line). Each JSON's `seconds` has
# the three phases (replies, layer profile, bridges); wall time is printed by `time`.
set -euo pipefail
time d3 calibrate --json -o /tmp/cal-embedded.safetensors > embedded.json                  # defaults, embedded model
time d3 calibrate --prompts 32 --profile-texts 8 --json -o /tmp/cal-half.safetensors > embedded-half.json
python qwen05_shape.py /tmp/q05                                                          # a 0.5B-shaped model
time d3 calibrate --model /tmp/q05 --json -o /tmp/cal-q05.safetensors > qwen05-shape.json
