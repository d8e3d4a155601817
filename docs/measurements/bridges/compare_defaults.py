"""The old defaults against the new ones on the held-out texts, and their decode speedups, measured in turns.

    .venv/bin/python docs/measurements/bridges/compare_defaults.py DATA_DIR > docs/measurements/bridges/compare.json

Old: α 0.98, floor 24, middle order, no bridges (d3 before issue 11). New: α 0.98, floor 25, importance order from
the bundled calibration, bridges. Also floor 24 with bridges (the old depth with the new machinery). Quality as in
choose_defaults.py (profile-ppl's teacher-forced measurement over each text's first 128 positions); speed from
speed.alpha_rows: decode time of 256-token replies to the speed prompt at full depth over that with each schedule,
each step's median over 5 rounds, full depth and the schedule in turns.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import texts as heldout  # noqa: E402

from d3cli.core.model.loader import load  # noqa: E402
from d3cli.core.session.front_door import attach_calibration  # noqa: E402
from d3cli.core.session.settings import DecodeSettings  # noqa: E402
from d3cli.evaluation.speed import steps  # noqa: E402
from d3cli.evaluation.profile.layers import measure, report  # noqa: E402

SPEED_PROMPT = "Explain in a few paragraphs why the sky is blue and why sunsets are red."


def main() -> None:
    data_dir = Path(sys.argv[1])
    base = DecodeSettings()
    loaded = attach_calibration(load(None, device="cpu", dtype="float32"), base)
    choices = {
        "old defaults (α 0.98, floor 24, middle, no bridges)":
            dataclasses.replace(base, min_layers=24, skip_order="middle", bridges=False),
        "floor 24, importance, bridges": dataclasses.replace(base, min_layers=24),
        "new defaults (α 0.98, floor 25, importance, bridges)": base,
        "new defaults without bridges": dataclasses.replace(base, bridges=False),
    }
    schedules = {label: choice.schedule_for(30, loaded.calibration) for label, choice in choices.items()}
    rows = {label: {"skip_order": schedule.skip_order, "min_layers": schedule.min_layers,
                    "bridges": schedule.bridge_maps is not None} for label, schedule in schedules.items()}
    for kind in heldout.KINDS:
        found = measure(loaded.model, heldout.texts_of(kind, loaded, data_dir), schedules, 30)
        for row in report(found, schedules, 16, heldout.MAX_POSITIONS)["d3"]:
            rows[row["label"]][kind] = {"nll_increase": round(row["nll_increase"], 4),
                                        "top1_agreement": round(row["top1_agreement"], 4)}
        print(f"scored {kind}", file=sys.stderr, flush=True)
    prompt = list(loaded.tokenizer.apply_chat_template([{"role": "user", "content": SPEED_PROMPT}],
                                                       add_generation_prompt=True, tokenize=True)["input_ids"])
    costs = steps.step_times(loaded.model, prompt, schedules["new defaults (α 0.98, floor 25, importance, bridges)"],
                             64, 3)
    measured = steps.alpha_rows(loaded.model, prompt, list(schedules.values()), 256, 5, costs["t_fixed_ms"],
                                costs["t_layer_ms"], costs.get("t_bridge_ms", 0.0))
    for label, row in zip(schedules, measured):
        rows[label]["speed"] = {key: round(value, 4) for key, value in row.items() if isinstance(value, float)}
        print(f"{label}: {rows[label]}", file=sys.stderr, flush=True)
    print(json.dumps({"step_costs": costs, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
