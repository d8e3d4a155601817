"""The experiments behind docs/BRIDGES.md: which calibration text, how much of it, which fit, which order, which rank.

    .venv/bin/python docs/measurements/bridges/experiments.py DATA_DIR [PART ...] > docs/measurements/bridges/experiments.json

Parts: texts, ridge, orders, rank (default: all); ridge at 24 layers, orders at 24 and 21, rank at 24 and 21. Every number is a teacher-forced score of held-out text
(texts.py: GSM8K answers, BBH worked answers, the model's own replies, Python-docs prose, licence prose) on the
embedded SmolLM2-135M-Instruct, float32, CPU: a static plan that skips the first L - k layers of a drop order at every
reply position from 16 on (the positions D3 runs shallow), with or without bridges; reported as the mean NLL
increase over full depth (nats/token) and the share of positions whose most likely token is full depth's, both on
positions >= 16. Bridges come from d3's own BridgeFitter, fitted on the full-depth hidden states of reply positions
1..C-1 of a calibration corpus:

- self     the model's own greedy replies to d3's 128 built-in calibration prompts (d3 calibrate's corpus)
- gsm8k    GSM8K train reference answers after "Question: ... Answer:" (64 of them)
- bbh      the first two worked examples of every BBH cot-prompt (54)
Corpora are cut to a number of tokens by taking whole texts in order.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import texts as heldout  # noqa: E402

from d3cli.core.calibration.layer_profile import BUNDLED_PROFILE, importance_order, load_profile  # noqa: E402
from d3cli.core.calibration.model_calibration import BUNDLED_CALIBRATION, read_calibration  # noqa: E402
from d3cli.core.decode.bridges import BridgeFitter, Bridges  # noqa: E402
from d3cli.core.decode.schedule import drop_middle_first, runs_of_drop_order, skipped_runs  # noqa: E402
from d3cli.core.model.loader import load  # noqa: E402
from d3cli.evaluation.builtin_prompts import builtin_prompts
from d3cli.evaluation.calibrate.options import CalibrationOptions
from d3cli.evaluation.calibrate.stages import generate_corpus
from d3cli.evaluation.scoring import ContinuationScorer, ScoringText  # noqa: E402

HERE = Path(__file__).parent
LATE_FROM = 16
L = 30
FLEX = list(range(2, L - 2))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def calibration_corpus(name: str, loaded, data_dir: Path) -> list[ScoringText]:
    cache = HERE / f"corpus-{name}.json"
    if cache.is_file():
        return [ScoringText(row["id"], tuple(row["prompt_ids"]), tuple(row["continuation_ids"]))
                for row in json.loads(cache.read_text())]
    tokenizer = loaded.tokenizer
    if name == "self":
        found = generate_corpus(loaded, builtin_prompts(), CalibrationOptions(batch_size=16), lambda *a: None)
    elif name == "gsm8k":
        from d3cli.evaluation.tasks.gsm8k import solution_text

        rows = [json.loads(line) for line in (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()][200:264]
        found = [ScoringText(f"gsm8k-train/{i}", tuple(heldout.encode(tokenizer, f"Question: {r['question']}\nAnswer:")),
                             tuple(heldout.encode(tokenizer, " " + solution_text(r["answer"]), False)[:256]))
                 for i, r in enumerate(rows)]
    elif name == "bbh":
        from d3cli.evaluation.tasks.bbh import strip_canary

        found = []
        for path in sorted((data_dir / "bbh" / "cot-prompts").glob("*.txt")):
            description, *blocks = strip_canary(path.read_text()).strip().split("\n\nQ: ")
            for index in (0, 1):
                question, _, answer = blocks[index].partition("\nA: ")
                found.append(ScoringText(f"bbh/{path.stem}/{index}",
                                         tuple(heldout.encode(tokenizer, f"{description}\n\nQ: {question}\nA:")),
                                         tuple(heldout.encode(tokenizer, " " + answer, False)[:256])))
    else:
        raise KeyError(name)
    cache.write_text(json.dumps([{"id": t.id, "prompt_ids": list(t.prompt_ids),
                                  "continuation_ids": list(t.continuation_ids)} for t in found]) + "\n")
    return found


class States:
    """Full-depth inputs of every layer (and the last output) at reply positions 1..C-1 of a corpus, kept in memory
    so that many fits can be tried on them."""

    def __init__(self, model, texts, max_tokens: int | None = None):
        rows, count = [], 0
        for text in texts:
            captured = {}

            def observe(layer, hidden_in, hidden_out):
                captured[layer] = hidden_in[0, 1:].float().clone()
                if layer == L - 1:
                    captured[L] = hidden_out[0, 1:].float().clone()

            ContinuationScorer(model, text).score(None, observe)
            rows.append(torch.stack([captured[j] for j in range(L + 1)], dim=1))
            count += rows[-1].shape[0]
            if max_tokens is not None and count >= max_tokens:
                break
        self.hidden = torch.cat(rows)
        if max_tokens is not None:
            self.hidden = self.hidden[:max_tokens]

    def first(self, tokens: int) -> "States":
        """The states of the corpus's first `tokens` positions (whole texts in order, the last one cut)."""
        cut = object.__new__(States)
        cut.hidden = self.hidden[:tokens]
        return cut

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0]

    def fit(self, runs, ridge: float = 0.1, rank: int | None = None) -> Bridges:
        fitter = BridgeFitter(runs, self.hidden.shape[2])
        for start in range(0, self.tokens, 4096):
            chunk = self.hidden[start:start + 4096]
            fitter.add({layer: chunk[:, layer] for layer in range(L + 1)})
        return Bridges(fitter.solve(ridge, rank))


class Scores:
    """Held-out texts with their full-depth scores, scored under static plans (positions >= LATE_FROM skip)."""

    def __init__(self, model, kinds):
        self.model = model
        self.scorers = {kind: [ContinuationScorer(model, t) for t in texts if t.steps > LATE_FROM]
                        for kind, texts in kinds.items()}
        self.full = {kind: [scorer.score() for scorer in scorers] for kind, scorers in self.scorers.items()}

    def static(self, drop_order, depth: int, bridges=None) -> dict:
        result = {}
        for kind, scorers in self.scorers.items():
            increase, same, count = 0.0, 0, 0
            for scorer, (full_nll, full_top) in zip(scorers, self.full[kind]):
                plan = torch.zeros(L, scorer.text.steps, dtype=torch.bool)
                plan[list(drop_order[:L - depth]), LATE_FROM:] = True
                nll, top = scorer.score(plan, bridges=bridges)
                increase += float((nll[LATE_FROM:] - full_nll[LATE_FROM:]).sum())
                same += int((top[LATE_FROM:] == full_top[LATE_FROM:]).sum())
                count += scorer.text.steps - LATE_FROM
            result[kind] = {"nll_increase": round(increase / count, 4), "top1_agreement": round(same / count, 4)}
        return result


def runs_at(drop_order, depth):
    return list(skipped_runs([j for j in range(L) if j not in drop_order[:L - depth]], L))


def main() -> None:
    data_dir = Path(sys.argv[1])
    parts = sys.argv[2:] or ["texts", "ridge", "orders", "rank"]
    loaded = load(None, device="cpu", dtype="float32")
    model = loaded.model
    torch.set_grad_enabled(False)
    scores = Scores(model, {kind: heldout.texts_of(kind, loaded, data_dir) for kind in heldout.KINDS})
    # the importance order d3 uses: the bundled calibration's profile (measured on the model's own replies)
    importance = tuple(importance_order(read_calibration(BUNDLED_CALIBRATION).profile)(FLEX))
    gsm8k_importance = tuple(importance_order(load_profile(BUNDLED_PROFILE))(FLEX))  # measured on GSM8K answers
    middle = tuple(drop_middle_first(FLEX))
    corpora = {name: calibration_corpus(name, loaded, data_dir) for name in ("self", "gsm8k", "bbh")}
    report = {"held_out": {kind: {"texts": len(s), "positions": sum(x.text.steps - LATE_FROM for x in s)}
                           for kind, s in scores.scorers.items()},
              "corpora": {name: sum(t.steps for t in texts) for name, texts in corpora.items()}}
    started = time.time()

    def row(label, order, depth, bridges):
        result = {"label": label, "depth": depth, **scores.static(order, depth, bridges)}
        log(f"{time.time() - started:6.0f}s {label:40} {depth} " + "  ".join(
            f"{kind} {v['top1_agreement'] * 100:4.1f}% {v['nll_increase']:+.3f}" for kind, v in result.items()
            if isinstance(v, dict)))
        return result

    states = {}

    def states_of(name):  # each corpus's hidden states are gathered once, on first use
        if name not in states:
            states[name] = States(model, corpora[name])
        return states[name]

    if "texts" in parts:  # which calibration text, how much of it
        for name in corpora:
            states_of(name)
        rows = [row("no bridges", importance, 24, None)]
        for name in ("gsm8k", "bbh", "self"):
            rows.append(row(f"{name} ({states[name].tokens} tokens)", importance, 24,
                            states[name].fit(runs_at(importance, 24))))
        for tokens in (3000, 6000, 12000):
            cut = states_of("self").first(tokens)
            rows.append(row(f"self, first {tokens} tokens", importance, 24, cut.fit(runs_at(importance, 24))))
        report["texts"] = rows
    if "ridge" in parts:
        report["ridge"] = [row(f"self, ridge {ridge:g}", importance, 24,
                               states_of("self").fit(runs_at(importance, 24), ridge))
                           for ridge in (0.001, 0.01, 0.1, 0.3)]
    if "orders" in parts:  # do the importance order and the bridges add up?
        rows = []
        for depth in (24, 21):
            for name, order in (("middle", middle), ("importance (GSM8K answers)", gsm8k_importance),
                                ("importance (own replies)", importance)):
                rows.append(row(f"{name}, no bridges", order, depth, None))
                rows.append(row(f"{name}, bridged", order, depth, states_of("self").fit(runs_at(order, depth))))
        report["orders"] = rows
    if "rank" in parts:
        runs = list(runs_of_drop_order(L, importance, 20))
        rows = []
        for rank in (32, 128, None):
            bridges = states_of("self").fit(runs, rank=rank)
            for depth in (24, 21):
                rows.append({**row(f"rank {rank or 'full'}", importance, depth, bridges), "rank": rank,
                             "bytes_per_bridge": bridges[runs[0]].nbytes()})
        report["rank"] = rows
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
