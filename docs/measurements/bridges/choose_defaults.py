"""Choose α, the floor, head and tail with bridges and the measured order, on the embedded model.

    .venv/bin/python docs/measurements/bridges/choose_defaults.py DATA_DIR > docs/measurements/bridges/defaults.json

For every candidate schedule (bridged, the importance order of the bundled calibration) the held-out texts of
texts.py are scored teacher-forced under the real D3 schedule over their first 128 positions (profile-ppl's
measurement: mean NLL increase over full depth, and how often the top token stays full depth's), and its decode
speedup is predicted from this machine's measured step costs (T_fixed + k·T_layer + r·T_bridge, speed.step_times)
for 128- and 256-token replies. The goal of issue 11 for the defaults: decode speedup >= 1.25x with an NLL increase
<= 0.30 and top-1 agreement >= 0.75 on every kind. The candidates that meet it, or the trade-off if none does, go to
stdout as JSON; then the chosen schedule's decode speedup is measured (D3 and full depth in turns, medians of
rounds, speed.alpha_rows) against the plain schedule at the same depth.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import texts as heldout  # noqa: E402

from d3cli.core.model.loader import load  # noqa: E402
from d3cli.core.session.front_door import attach_calibration  # noqa: E402
from d3cli.core.session.settings import DecodeSettings  # noqa: E402
from d3cli.evaluation.speed import steps  # noqa: E402
from d3cli.evaluation.profile.layers import measure, report  # noqa: E402

ALPHAS = (0.9, 0.95, 0.98, 0.99)
FLOORS = (20, 21, 22, 23, 24, 25, 26)
HEAD_TAIL = ((2, 2), (2, 1), (1, 2))
SPEED_PROMPT = "Explain in a few paragraphs why the sky is blue and why sunsets are red."


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def predicted(schedule, tokens: int, costs: dict) -> float:
    steps = range(1, tokens)
    full = costs["t_fixed_ms"] + schedule.num_layers * costs["t_layer_ms"]
    total = sum(costs["t_fixed_ms"] + schedule.layers_at(step) * costs["t_layer_ms"]
                + steps.bridged_runs_at(schedule, step) * costs.get("t_bridge_ms", 0.0) for step in steps)
    return full * len(steps) / total


def main() -> None:
    data_dir = Path(sys.argv[1])
    started = time.time()
    loaded = load(None, device="cpu", dtype="float32")
    base = DecodeSettings()
    loaded = attach_calibration(loaded, base)
    kinds = {kind: heldout.texts_of(kind, loaded, data_dir) for kind in heldout.KINDS}
    prompt = list(loaded.tokenizer.apply_chat_template([{"role": "user", "content": SPEED_PROMPT}],
                                                       add_generation_prompt=True, tokenize=True)["input_ids"])
    probe = base.schedule_for(30, loaded.calibration)
    costs = steps.step_times(loaded.model, prompt, probe, 64, 3)
    log(f"{time.time() - started:.0f}s step costs: {costs['t_fixed_ms']:.2f} + k × {costs['t_layer_ms']:.3f} ms, "
        f"bridge {costs.get('t_bridge_ms', 0):.3f} ms per run")

    candidates = []
    settings = [dataclasses.replace(base, alpha=alpha, min_layers=floor, head=head, tail=tail)
                for (head, tail), alpha, floor in itertools.product(HEAD_TAIL, ALPHAS, FLOORS)
                if (head, tail) == (2, 2) or alpha == 0.95]
    schedules = {}
    for choice in settings:
        schedule = choice.schedule_for(30, loaded.calibration)
        label = f"α={choice.alpha:g} floor {choice.min_layers} head {choice.head} tail {choice.tail}"
        schedules[label] = schedule
        schedules[label + " plain"] = schedule.with_bridge_maps(None)
    results = {}
    for kind, texts in kinds.items():
        found = measure(loaded.model, texts, schedules, 30)
        results[kind] = {row["label"]: row for row in report(found, schedules, 16, heldout.MAX_POSITIONS)["d3"]}
        log(f"{time.time() - started:.0f}s scored {kind}")
    for label, schedule in schedules.items():
        row = {"label": label, "alpha": schedule.alpha, "min_layers": schedule.min_layers, "head": schedule.head,
               "tail": schedule.tail, "bridges": schedule.bridge_maps is not None,
               "predicted_speedup_128": round(predicted(schedule, 128, costs), 4),
               "predicted_speedup_256": round(predicted(schedule, 256, costs), 4)}
        for kind in kinds:
            measured = results[kind][label]
            row[kind] = {"nll_increase": round(measured["nll_increase"], 4),
                         "top1_agreement": round(measured["top1_agreement"], 4),
                         "mean_layers": round(measured["mean_layers"], 3)}
        row["worst_nll_increase"] = max(row[kind]["nll_increase"] for kind in kinds)
        row["worst_top1_agreement"] = min(row[kind]["top1_agreement"] for kind in kinds)
        row["meets_goal"] = (row["predicted_speedup_256"] >= 1.25 and row["worst_nll_increase"] <= 0.30
                             and row["worst_top1_agreement"] >= 0.75)
        candidates.append(row)
        log(f"{label:44} speedup {row['predicted_speedup_128']:.3f}/{row['predicted_speedup_256']:.3f} " + "  ".join(
            f"{kind} {row[kind]['top1_agreement'] * 100:4.1f}% {row[kind]['nll_increase']:+.3f}" for kind in kinds))
    print(json.dumps({"step_costs": costs, "texts": {kind: len(texts) for kind, texts in kinds.items()},
                      "candidates": candidates}, indent=1))


if __name__ == "__main__":
    main()
