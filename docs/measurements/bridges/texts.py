"""The held-out texts every bridge measurement in docs/BRIDGES.md scores: none of them is calibration text.

Five kinds, each a list of d3 ScoringTexts (prompt, continuation) for a tokenizer:

- gsm8k   GSM8K test problems 32-63 after d3 bench's 8-shot prompt, their reference solutions as continuations
- bbh     the worked chain-of-thought answers of the BBH cot-prompts: for each subtask, the third worked example's
          answer after the task description, the first two worked examples and its question (27 texts)
- replies the embedded model's own greedy full-depth replies to heldout_prompts.py (never calibration prompts)
- python-docs  English prose of Python's own language reference (pydoc_data.topics), 32 tokens of prompt each
- licences     English legal prose of this machine's /usr/share/common-licenses, 32 tokens of prompt each

Usage: texts_of(kind, loaded, data_dir) -> list[ScoringText]; `replies` are generated once and cached in
docs/measurements/bridges/heldout-replies.json (token ids of the embedded model).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from d3cli.evaluation.scoring import ScoringText

HERE = Path(__file__).parent
KINDS = ("gsm8k", "bbh", "replies", "python-docs", "licences")
MAX_POSITIONS = 128


def texts_of(kind: str, loaded, data_dir: Path) -> list[ScoringText]:
    return {"gsm8k": gsm8k, "bbh": bbh, "replies": replies, "python-docs": python_docs,
            "licences": licences}[kind](loaded, data_dir)


def encode(tokenizer, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def gsm8k(loaded, data_dir: Path) -> list[ScoringText]:
    from d3cli.evaluation.profile.corpus import reference_texts
    from d3cli.evaluation.tasks.base import TaskOptions
    from d3cli.evaluation.tasks.gsm8k import Gsm8kTask

    examples = Gsm8kTask().examples(data_dir, TaskOptions(limit=32, offset=32))
    return reference_texts(loaded.tokenizer, examples, MAX_POSITIONS, 8192)


def bbh(loaded, data_dir: Path) -> list[ScoringText]:
    from d3cli.evaluation.tasks.bbh import strip_canary

    texts = []
    for path in sorted((data_dir / "bbh" / "cot-prompts").glob("*.txt")):
        description, *blocks = strip_canary(path.read_text(encoding="utf-8")).strip().split("\n\nQ: ")
        question, _, answer = blocks[2].partition("\nA: ")
        prompt = "\n\nQ: ".join([description, *blocks[:2]]) + f"\n\nQ: {question}\nA:"
        continuation = encode(loaded.tokenizer, " " + answer, special=False)[:MAX_POSITIONS]
        texts.append(ScoringText(f"bbh/{path.stem}", tuple(encode(loaded.tokenizer, prompt)), tuple(continuation)))
    return texts


def replies(loaded, data_dir: Path) -> list[ScoringText]:
    cache = HERE / "heldout-replies.json"
    if cache.is_file():
        return [ScoringText(row["id"], tuple(row["prompt_ids"]), tuple(row["reply_ids"]))
                for row in json.loads(cache.read_text())]
    import heldout_prompts

    from d3cli.core.decode.engine import generate
    from d3cli.core.decode.schedule import DecaySchedule
    from d3cli.core.model.model_facts import num_decoder_layers
    from d3cli.evaluation.builtin_prompts import encode_builtin

    prompts = [("chat", text) for text in heldout_prompts.CHAT] + [("raw", text) for text in heldout_prompts.RAW]
    full = DecaySchedule.build(num_decoder_layers(loaded.model), alpha=1.0)
    rows = []
    for number, (kind, text) in enumerate(prompts):
        prompt_ids = encode_builtin(loaded.tokenizer, kind, text)
        reply = generate(loaded.model, loaded.tokenizer, [prompt_ids], full, max_new_tokens=160)[0]
        rows.append({"id": f"{kind}/{number}", "prompt_ids": prompt_ids, "reply_ids": reply.token_ids})
    cache.write_text(json.dumps(rows) + "\n")
    return replies(loaded, data_dir)


def _prose_pieces(loaded, documents, count: int, prompt_tokens: int = 32) -> list[ScoringText]:
    texts = []
    for name, text in documents:
        ids = encode(loaded.tokenizer, text, special=False)
        width = prompt_tokens + MAX_POSITIONS
        for start in range(0, len(ids) - width, width):
            texts.append(ScoringText(f"{name}/{start}", tuple(ids[start:start + prompt_tokens]),
                                     tuple(ids[start + prompt_tokens:start + width])))
            if len([t for t in texts if t.id.startswith(name)]) >= 4:
                break
        if len(texts) >= count:
            break
    return texts[:count]


def python_docs(loaded, data_dir: Path) -> list[ScoringText]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    random.Random(0).shuffle(keys)
    documents = []
    for key in keys:
        paragraphs = [" ".join(p.split()) for p in topics[key].split("\n\n")]
        paragraphs = [p for p in paragraphs if len(p.split()) > 25 and "::" not in p and not p.startswith(">>>")]
        if paragraphs:
            documents.append((f"python-docs/{key}", "\n\n".join(paragraphs)))
    return _prose_pieces(loaded, documents, 24)


def licences(loaded, data_dir: Path) -> list[ScoringText]:
    documents = []
    for name in ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-3", "Artistic"):
        text = Path(f"/usr/share/common-licenses/{name}").read_text(encoding="utf-8")
        documents.append((f"licences/{name}", "\n\n".join(" ".join(p.split()) for p in text.split("\n\n")
                                                          if len(p.split()) > 20)))
    return _prose_pieces(loaded, documents, 24)
