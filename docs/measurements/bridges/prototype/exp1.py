import sys; sys.path.insert(0, str(__import__('pathlib').Path(__file__).parent))

from bridge import *
from common import *

from d3cli.core.calibration.layer_profile import BUNDLED_PROFILE, importance_order, load_profile
from d3cli.core.decode.schedule import drop_middle_first

m = loaded(); model = m.model; L = 30
prof = load_profile(BUNDLED_PROFILE)
flex = list(range(2, 28))
ORDERS = {"importance": tuple(importance_order(prof)(flex)), "middle": tuple(drop_middle_first(flex))}

def texts_of(name):
    if name == "self": return self_replies(None, None, 0, "/tmp/br/self_calib.json")
    if name == "self_heldout": return self_replies(None, None, 0, "/tmp/br/self_heldout.json")
    if name == "gsm_train": return gsm8k_texts(200, 64, split="train", max_pos=256)
    if name == "bbh_cal": return bbh_cot_texts(which=(1, 2), max_pos=256)
    if name == "prose_cal": return prose_texts(48, skip=24, max_pos=256)
    if name == "gsm_eval": return gsm8k_texts(32, 16)
    if name == "bbh_eval": return bbh_cot_texts(which=(0,))
    if name == "prose_eval": return prose_texts(24)
    raise KeyError(name)

def states(name):
    p = Path(f"/tmp/br/H_{name}.pt")
    if p.exists(): return torch.load(p)
    t = time.time()
    Hs, meta = [], []
    for tx in texts_of(name):
        H = capture(model, tx)
        Hs.append(H); meta += [(tx.id, s) for s in range(H.shape[0])]
    H = torch.cat(Hs)
    torch.save({"H": H, "meta": meta}, p)
    print(f"captured {name}: {H.shape[0]} tokens in {time.time()-t:.0f}s", flush=True)
    return {"H": H, "meta": meta}

EVAL = ["gsm_eval", "bbh_eval", "self_heldout", "prose_eval"]
_scorers = {}
def scorers(name):
    if name not in _scorers:
        _scorers[name] = [ContinuationScorer(model, t) for t in texts_of(name)]
    return _scorers[name]
_full = {}
def full(name, i, sc):
    if (name, i) not in _full:
        _full[(name, i)] = sc.score(None)
    return _full[(name, i)]

def evaluate(order, depth, bridges, bias=False, sets=EVAL, from_pos=16):
    res = {}
    for name in sets:
        dn, agree, cnt = 0.0, 0, 0
        for i, sc in enumerate(scorers(name)):
            C = sc.text.steps
            if C <= from_pos: continue
            fn, ft = full(name, i, sc)
            plan = static_plan(L, ORDERS[order], depth, C, from_pos)
            n, t = score(model, sc, plan, bridges, bias)
            dn += float((n[from_pos:] - fn[from_pos:]).sum()); agree += int((t[from_pos:] == ft[from_pos:]).sum()); cnt += C - from_pos
        res[name] = (dn / cnt, agree / cnt)
    return res

def fit_all(H, order, depth, **kw):
    skipped = set(ORDERS[order][: L - depth])
    return {(a, b): fit(H, a, b, **kw) for a, b in runs_of(skipped, L)}

def fmt(res):
    return "  ".join(f"{k[:9]:>9} {v[1]*100:5.1f}% {v[0]:+.3f}" for k, v in res.items())
