import sys; sys.path.insert(0, str(__import__('pathlib').Path(__file__).parent))
import exp1
from exp1 import *

_orig = exp1.texts_of
def texts_of(name):
    if name == "self2": return self_replies(None, None, 0, "/tmp/br/self_calib2.json")
    if name == "lic_eval": return license_texts()
    return _orig(name)
exp1.texts_of = texts_of
EV = ["gsm_eval", "bbh_eval", "self_heldout", "prose_eval", "lic_eval"]
t = time.time()
def show(label, depth, br):
    print(f"{label:28} {depth}", fmt(evaluate("importance", depth, br, sets=EV)), f"{time.time()-t:.0f}s", flush=True)
H1 = states("self")["H"]; H2 = states("self2")["H"]; H12 = torch.cat([H1, H2])
for depth in [24, 21]:
    show("plain", depth, {})
    show("self ridge .1", depth, fit_all(H1, "importance", depth, weight="none", ridge=0.1))
    if depth == 24:
        show("self2 ridge .1", depth, fit_all(H2, "importance", depth, weight="none", ridge=0.1))
    for r in [0.03, 0.1, 0.3]:
        show(f"self+self2 ridge {r}", depth, fit_all(H12, "importance", depth, weight="none", ridge=r))
