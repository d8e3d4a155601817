"""What a calibration made on one kind of weights costs on another: teacher-forced NLL of held-out gsm8k answers
at full depth and at the defaults (the calibration's importance order and bridges), for the embedded model run in
float32 (its file dequantized) and in int4 (auto: its Q4_1 blocks on d3's kernels), with the bundled
calibration (made on float32 weights) and with one made by `d3 calibrate` on int4 weights.

    d3 calibrate --json -o /tmp/cal-int4.safetensors > calibrate-int4.json     # auto: int4 weights
    python calibration_kinds.py --data-dir ../shared/data --int4-calibration /tmp/cal-int4.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from d3cli.core.calibration.model_calibration import BUNDLED_CALIBRATION
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.core.model import loader
from d3cli.core.session.front_door import attach_calibration
from d3cli.core.session.settings import DecodeSettings
from d3cli.evaluation.scoring import ScoringText, mean_nll_under


def texts_from(data_dir: Path, tokenizer, first: int, count: int, max_tokens: int) -> list[ScoringText]:
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()]
    texts = []
    for index, row in enumerate(rows[first:first + count]):
        prompt = tokenizer.encode(f"Question: {row['question']}\nAnswer:", add_special_tokens=False)
        answer = tokenizer.encode(" " + row["answer"], add_special_tokens=False)[:max_tokens]
        texts.append(ScoringText(str(first + index), tuple(prompt), tuple(answer)))
    return texts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--int4-calibration", required=True)
    parser.add_argument("--first", type=int, default=500)
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    calibrations = {"bundled (made on float32)": str(BUNDLED_CALIBRATION),
                    "made on int4": args.int4_calibration}
    rows = []
    for weights in ("float32", "auto"):
        base = loader.load(None, weights=weights)
        texts = texts_from(args.data_dir, base.tokenizer, args.first, args.texts, args.max_tokens)
        for name, path in calibrations.items():
            settings = DecodeSettings(calibration=path)
            loaded = attach_calibration(base, settings)
            num_layers = loader.num_decoder_layers(loaded.model)
            schedule = settings.schedule_for(num_layers, loaded.calibration)
            full, decayed = mean_nll_under(loaded.model, texts, [DecaySchedule.full(num_layers), schedule])
            row = {"weights": loaded.weights.label(), "calibration": name, "alpha": schedule.alpha,
                   "min_layers": schedule.min_layers, "full_depth_nll": full, "defaults_nll": decayed,
                   "cost_nats": decayed - full, "tokens": sum(text.steps for text in texts)}
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
