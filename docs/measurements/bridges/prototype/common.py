import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent.parent))
from d3cli.core.decode.engine import generate
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.core.model.loader import load
from d3cli.core.text.prompts import encode_chat
from d3cli.evaluation.profile.corpus import reference_texts
from d3cli.evaluation.scoring import ScoringText
from d3cli.evaluation.tasks.base import TaskOptions
from d3cli.evaluation.tasks.bbh import strip_canary
from d3cli.evaluation.tasks.gsm8k import Gsm8kTask

DATA = Path("/work/main/../shared/data")
torch.set_grad_enabled(False)
_loaded = None
def loaded():
    global _loaded
    if _loaded is None:
        _loaded = load(None)
    return _loaded

def encode_raw(tok, text):
    return list(tok(text, add_special_tokens=True)["input_ids"])

def self_replies(prompts_chat, prompts_raw, max_tokens, cache_file, batch=16):
    p = Path(cache_file)
    if p.exists():
        return [ScoringText(d["id"], tuple(d["p"]), tuple(d["c"])) for d in json.loads(p.read_text())]
    m = loaded(); tok = m.tokenizer
    items = [(f"chat/{i}", encode_chat(tok, [{"role": "user", "content": q}])) for i, q in enumerate(prompts_chat)]
    items += [(f"raw/{i}", encode_raw(tok, q)) for i, q in enumerate(prompts_raw)]
    full = DecaySchedule.build(30, alpha=1.0)
    out = []
    t = time.time()
    for s in range(0, len(items), batch):
        chunk = items[s:s+batch]
        replies = generate(m.model, tok, [ids for _, ids in chunk], full, max_new_tokens=max_tokens)
        for (i, ids), r in zip(chunk, replies):
            out.append({"id": i, "p": ids, "c": list(r.token_ids)})
        print(f"  generated {len(out)}/{len(items)} {time.time()-t:.0f}s", flush=True)
    p.write_text(json.dumps(out))
    return [ScoringText(d["id"], tuple(d["p"]), tuple(d["c"])) for d in out]

def gsm8k_texts(offset, limit, max_pos=128, split="test"):
    m = loaded()
    if split == "test":
        ex = Gsm8kTask().examples(DATA, TaskOptions(limit=limit, offset=offset))
        return reference_texts(m.tokenizer, ex, max_pos, 8192)
    # train answers after their question (zero-shot "Question: .. Answer:" prompt)
    from d3cli.evaluation.tasks.gsm8k import solution_text
    rows = [json.loads(l) for l in (DATA/"gsm8k/train.jsonl").read_text().splitlines()[offset:offset+limit]]
    out = []
    for i, r in enumerate(rows):
        p = encode_raw(m.tokenizer, f"Question: {r['question']}\nAnswer:")
        c = list(m.tokenizer(" " + solution_text(r["answer"]), add_special_tokens=False)["input_ids"])[:max_pos]
        out.append(ScoringText(f"train/{i}", tuple(p), tuple(c)))
    return out

def bbh_cot_texts(which=(0,), max_pos=128):
    """Worked examples of the cot-prompts: question (with the task description) -> worked answer."""
    m = loaded(); tok = m.tokenizer
    out = []
    for f in sorted((DATA/"bbh/cot-prompts").glob("*.txt")):
        desc, *blocks = strip_canary(f.read_text()).strip().split("\n\nQ: ")
        for k in which:
            if k >= len(blocks): continue
            q, _, a = blocks[k].partition("\nA: ")
            p = encode_raw(tok, f"{desc}\n\nQ: {q}\nA:")
            c = list(tok(" " + a, add_special_tokens=False)["input_ids"])[:max_pos]
            out.append(ScoringText(f"bbh/{f.stem}/{k}", tuple(p), tuple(c)))
    return out

def prose_texts(n, skip=0, prompt_tokens=32, max_pos=128):
    """Paragraph groups of Python's own documentation (pydoc topics): plain English prose."""
    from pydoc_data.topics import topics
    m = loaded(); tok = m.tokenizer
    out = []
    keys = sorted(topics)
    rng = random.Random(0); rng.shuffle(keys)
    for key in keys:
        paras = [p.strip() for p in topics[key].split("\n\n")]
        paras = [" ".join(p.split()) for p in paras if len(p.split()) > 25 and not p.startswith(("   ", ">>>")) and "::" not in p]
        text = "\n\n".join(paras)
        ids = encode_raw(tok, text)
        if len(ids) < prompt_tokens + 64: continue
        out.append(ScoringText(f"prose/{key}", tuple(ids[:prompt_tokens]), tuple(ids[prompt_tokens:prompt_tokens+max_pos])))
    return out[skip:skip+n]

def license_texts(n=24, prompt_tokens=32, max_pos=128):
    """Legal prose: the GNU and other licence texts of this machine, cut into 160-token pieces."""
    m = loaded(); tok = m.tokenizer
    out = []
    for name in ["GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-3", "Artistic"]:
        text = Path(f"/usr/share/common-licenses/{name}").read_text()
        text = "\n\n".join(" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) > 20)
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        step = prompt_tokens + max_pos
        for k in range(0, min(len(ids) - step, 4 * step), step):
            out.append(ScoringText(f"lic/{name}/{k}", tuple(ids[k:k+prompt_tokens]), tuple(ids[k+prompt_tokens:k+step])))
    return out[:n]
