#!/bin/bash
# d3 bench in one process against two (accelerate launch), embedded model, GSM8K, first 8, full and d3, 64 tokens.
# Run from this folder with the repository's .venv; D3_DATA_DIR=../shared/data or --data-dir. Each run's wall time is
# printed by `time`; summaries go to *.json, per-example records to *.jsonl.
set -euo pipefail
venv=../../../../.venv/bin
data=${D3_DATA_DIR:-../../../../../shared/data}
args=(bench --task gsm8k --limit 8 --methods d3 -n 64 --data-dir "$data" --json)
launch=("$venv/accelerate" launch --num_machines 1 --mixed_precision no --dynamo_backend no
        --main_process_ip 127.0.0.1 --main_process_port 29650)
round=${1:-1}
rm -f one-$round.jsonl* one-thread-$round.jsonl* two-$round.jsonl* cpu-flag-$round.jsonl*
# one process, torch's default threads (2 on this machine)
time "$venv/d3" "${args[@]}" -o one-$round.jsonl > one-$round.json
# one process, one thread (what each of the two processes below gets; round 1 has it as cpu-flag-1, below)
if [ "$round" != 1 ]; then
  time OMP_NUM_THREADS=1 "$venv/d3" "${args[@]}" -o one-thread-$round.jsonl > one-thread-$round.json
fi
# two processes, one thread each (accelerate's torchrun launcher; --multi_gpu is its name, gloo on the CPU)
time "${launch[@]}" --multi_gpu --num_processes 2 -m d3cli "${args[@]}" -o two-$round.jsonl > two-$round.json
# what `accelerate launch --cpu --num_processes 2` does without mpirun: one process, one thread
if [ "$round" = 1 ]; then
  time "${launch[@]}" --cpu --num_processes 2 -m d3cli "${args[@]}" -o cpu-flag-$round.jsonl > cpu-flag-$round.json
fi
