import sys; sys.path.insert(0, str(__import__('pathlib').Path(__file__).parent))
from exp1 import *

t = time.time()
S = states("self"); H = S["H"]; meta = S["meta"]
def show(label, br, **kw):
    print(f"{label:28}", fmt(evaluate("importance", 24, br, **kw)), f"{time.time()-t:.0f}s", flush=True)
for r in [0.1, 0.3]:
    show(f"self ridge {r}", fit_all(H, "importance", 24, weight="none", ridge=r))
ids = sorted({i for i, _ in meta}, key=lambda s: (s.split('/')[0], int(s.split('/')[1])))
for n in [16, 32]:
    pick = set(ids[:n * 3 // 4] + [i for i in ids if i.startswith("raw")][: n // 4])
    mask = torch.tensor([i in pick for i, _ in meta])
    show(f"self {n} prompts ({int(mask.sum())} tok)", fit_all(H[mask], "importance", 24, weight="none", ridge=1e-2))
mask = torch.tensor([s >= 16 for _, s in meta])
show(f"self pos>=16 ({int(mask.sum())})", fit_all(H[mask], "importance", 24, weight="none", ridge=1e-2))
Hall = torch.cat([states(c)["H"] for c in ["self", "gsm_train", "bbh_cal", "prose_cal"]])
show(f"mix all ({Hall.shape[0]})", fit_all(Hall, "importance", 24, weight="none", ridge=1e-2))
Hsp = torch.cat([states(c)["H"] for c in ["self", "prose_cal"]])
show(f"self+prose ({Hsp.shape[0]})", fit_all(Hsp, "importance", 24, weight="none", ridge=1e-2))
# pre-norm input: delta = rmsnorm(h) W
def prenorm_bridges(Hx, order, depth, ridge=1e-2):
    skipped = set(ORDERS[order][: L - depth]); out = {}
    for a, b in runs_of(skipped, L):
        X = Hx[:, a]; r = X.pow(2).mean(-1, keepdim=True).sqrt()
        out[(a, b)] = (fit_xy(X / r, Hx[:, b + 1] - Hx[:, a], ridge))
    return out
import bridge

orig = bridge.Bridged.hook
def prenorm_hook(self, j):
    def h(module, args, kwargs, output):
        hout = output[0] if isinstance(output, tuple) else output
        hin = args[0] if args else kwargs["hidden_states"]
        rep = torch.where(self.plan[j][None, :, None], hin, hout)
        for a, ps in self.ends.get(j, {}).items():
            W = self.bridges.get((a, j))
            if W is None: continue
            x = hin[0, ps]; r = x.pow(2).mean(-1, keepdim=True).sqrt()
            rep = rep.clone(); rep[0, ps] = x + (x / r) @ W
        return (rep, *output[1:]) if isinstance(output, tuple) else rep
    return h
bridge.Bridged.hook = prenorm_hook
show("self prenorm", prenorm_bridges(H, "importance", 24))
bridge.Bridged.hook = orig
