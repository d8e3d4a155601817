"""Full-depth quality of every weight kind d3 runs, against the GGUF file's own dequantized weights in float32.

    python quality.py --data-dir ../shared/data > quality.json

Held-out text: gsm8k test questions with their reference answers, rows 500 onward (d3's calibration and layer
profiles use its own prompts and the first rows). For each kind: mean NLL per token, its difference from the
reference, top-1 agreement with the reference's argmax at every position, and the weight bytes one decode step
streams. Two families: the embedded GGUF file run as it is (its Q4_1 blocks as int4 group 32, its Q8_0 head as
int8; on d3's kernels, whose activations are int8 per block of 32, and on torch's, with bfloat16 activations) or
dequantized; and the same weights saved as a float32 safetensors folder (transformers' own layers, so the folder
holds transformers' names), quantized on load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from d3cli import kernels
from d3cli.core.model import loader


def texts_from(data_dir: Path, first: int, count: int) -> list[str]:
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()]
    return [f"Question: {row['question']}\nAnswer: {row['answer']}" for row in rows[first:first + count]]


def scores(model, tokenizer, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per text: the log-probabilities of each next token (float32) and the argmax at each position."""
    found = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            log_probs = model(ids).logits.float().log_softmax(-1)[0, :-1]
            found.append((log_probs.gather(-1, ids[0, 1:, None])[:, 0], log_probs.argmax(-1)))
    return found


def compare(name: str, loaded, texts, reference) -> dict:
    started = time.perf_counter()
    mine = scores(loaded.model, loaded.tokenizer, texts)
    nll = -float(torch.cat([token for token, _ in mine]).mean())
    row = {"weights": name, "detail": loaded.weights.label() if loaded.weights else "", "nll": nll,
           "step_mb": loaded.weights.step_bytes / 1e6 if loaded.weights else None,
           "seconds": time.perf_counter() - started}
    if reference is not None:
        ref_nll = -float(torch.cat([token for token, _ in reference]).mean())
        agree = torch.cat([(a == b).float() for (_, a), (_, b) in zip(mine, reference)])
        row.update(delta_nll=nll - ref_nll, top1_agreement=float(agree.mean()))
    print(json.dumps(row), file=sys.stderr)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--first", type=int, default=500)
    parser.add_argument("--texts", type=int, default=32)
    args = parser.parse_args()
    texts = texts_from(args.data_dir, args.first, args.texts)
    torch.manual_seed(0)
    dense = loader.load(loader.ModelOptions(None, weights="float32", fused=False))
    reference = scores(dense.model, dense.tokenizer, texts)
    rows = {"texts": len(texts), "tokens": sum(len(log_probs) for log_probs, _ in reference),
            "kernels": kernels.description(), "gguf": [], "on_load": []}
    rows["gguf"].append(compare("float32 (the file dequantized: the reference)", dense, texts, None))
    for name, options in [("auto: int4 from Q4_1, int8 head from Q8_0 (d3's kernels)", {}),
                          ("int8 (the Q4_1 blocks requantized per channel)", {"weights": "int8"}),
                          ("bfloat16 dense", {"weights": "bfloat16"})]:
        rows["gguf"].append(compare(name, loader.load(None, **options), texts, reference))
    with kernels.turned_off():
        on_torch = loader.load(None)
    rows["gguf"].append(compare("auto on torch's kernels (bfloat16 activations)", on_torch, texts, reference))
    with tempfile.TemporaryDirectory() as folder:
        dense.model.save_pretrained(folder)
        dense.tokenizer.save_pretrained(folder)
        for name, options in [("int8 per channel", {"weights": "int8"}),
                              ("int4 group 32", {"weights": "int4", "group_size": 32}),
                              ("int4 group 64", {"weights": "int4", "group_size": 64}),
                              ("int4 group 128", {"weights": "int4", "group_size": 128}),
                              ("bfloat16", {"weights": "bfloat16"})]:
            rows["on_load"].append(compare(name, loader.load(folder, **options), texts, reference))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
