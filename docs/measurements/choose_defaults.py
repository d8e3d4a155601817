"""How d3's default min-layers, head, tail and skip order were chosen (docs/DEFAULTS.md has the numbers).

On the embedded SmolLM2-135M-Instruct, for N GSM8K questions through the chat template:
1. decode a full-depth greedy reference reply per question (d3's engine at alpha = 1);
2. teacher-force each reference through d3's engine under a candidate schedule (a "sampler" that returns the
   reference token), and record per token the NLL of the reference token and whether the schedule's argmax agrees;
3. skip one layer at a time (every step after the first) to see which layers the model cannot do without.

Run: python docs/measurements/choose_defaults.py --data-dir ../shared/data [--questions 24] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from d3cli.core.decode.engine import generate, generate_steps, make_prompt_batch
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.core.model.loader import load
from d3cli.core.text.prompts import encode_chat


def questions(data_dir: Path, count: int) -> list[str]:
    with open(data_dir / "gsm8k" / "test.jsonl") as handle:
        return [json.loads(line)["question"] for _, line in zip(range(count), handle)]


def teacher_forced(model, prompts, references, schedule, pad_id):
    """Per-token NLL of the reference and argmax agreement under `schedule`, decoding with d3's engine."""
    steps = max(len(reference) for reference in references)
    forced = torch.full((len(references), steps), pad_id)
    valid = torch.zeros((len(references), steps), dtype=torch.bool)
    for row, reference in enumerate(references):
        forced[row, : len(reference)] = torch.tensor(reference)
        valid[row, : len(reference)] = True
    nll, agree = [], []
    batch = make_prompt_batch(prompts, pad_id, "cpu")
    step_index = iter(range(steps))

    def force(logits):
        return forced[:, next(step_index)]

    for step in generate_steps(model, batch, schedule, force, steps, pad_token_id=pad_id):
        log_probs = torch.log_softmax(step.logits, dim=-1)
        target = forced[:, step.index]
        nll.append(-log_probs.gather(1, target[:, None]).squeeze(1))
        agree.append(step.logits.argmax(-1) == target)
    nll, agree = torch.stack(nll, 1), torch.stack(agree, 1)
    return nll[valid].mean().item(), agree[valid].float().mean().item()


def mean_layers(schedule, references):
    counts = [schedule.layers_at(i) for reference in references for i in range(len(reference))]
    return sum(counts) / len(counts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("D3_DATA_DIR", "../shared/data")))
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("docs/measurements/defaults.json"))
    args = parser.parse_args()
    torch.manual_seed(0)

    loaded = load(None, device="cpu", dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    num_layers = model.config.num_hidden_layers
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in questions(args.data_dir, args.questions)]
    pad_id = tokenizer.pad_token_id
    started = time.time()
    full = DecaySchedule.build(num_layers, alpha=1.0, min_layers=num_layers, head=1, tail=1)
    references = [reply.token_ids for reply in generate(model, tokenizer, prompts, full, max_new_tokens=args.tokens)]
    print(f"references: {sum(map(len, references))} tokens in {time.time() - started:.0f} s")
    results = {"questions": args.questions, "tokens": args.tokens, "reference_tokens": sum(map(len, references))}

    base_nll, base_agree = teacher_forced(model, prompts, references, full, pad_id)
    results["full_depth"] = {"nll": base_nll, "agreement": base_agree}
    print(f"full depth: nll {base_nll:.4f} agreement {base_agree:.4f}")

    single = []
    for layer in range(num_layers):
        head, tail = (0, 1) if layer == 0 else (1, 0)
        schedule = DecaySchedule.build(
            num_layers, alpha=0.01, min_layers=num_layers - 1, head=head, tail=tail,
            skip_order=lambda flex, layer=layer: [layer] + [f for f in flex if f != layer], skip_order_name=f"only-{layer}",
        )
        nll, agree = teacher_forced(model, prompts, references, schedule, pad_id)
        single.append({"layer": layer, "delta_nll": nll - base_nll, "agreement": agree})
        print(f"skip layer {layer:2d} alone: dNLL {nll - base_nll:+.4f} agreement {agree:.4f}")
    results["single_layer"] = single

    sweep = []
    for order in ("middle", "late"):
        for head, tail in ((1, 1), (2, 2), (3, 3), (4, 2), (2, 4)):
            for min_layers in (15, 18, 21, 24, 27):
                if head + tail > min_layers:
                    continue
                schedule = DecaySchedule.build(num_layers, alpha=0.98, min_layers=min_layers, head=head, tail=tail,
                                               skip_order=order)
                nll, agree = teacher_forced(model, prompts, references, schedule, pad_id)
                row = {"order": order, "head": head, "tail": tail, "min_layers": min_layers,
                       "mean_layers": mean_layers(schedule, references), "delta_nll": nll - base_nll,
                       "agreement": agree}
                sweep.append(row)
                print(json.dumps(row))
    results["sweep_alpha_0.98"] = sweep
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"done in {time.time() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
