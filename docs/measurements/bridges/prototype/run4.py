import sys; sys.path.insert(0, str(__import__('pathlib').Path(__file__).parent))
import exp1
from exp1 import *

_orig = exp1.texts_of
def texts_of(name):
    if name == "self2": return self_replies(None, None, 0, "/tmp/br/self_calib2.json")
    if name == "lic_eval": return license_texts()
    if name == "select": return self_replies(None, None, 0, "/tmp/br/self_calib.json")[::5]
    return _orig(name)
exp1.texts_of = texts_of
EV = ["gsm_eval", "bbh_eval", "self_heldout", "prose_eval", "lic_eval"]
t = time.time()
H = torch.cat([states("self")["H"], states("self2")["H"]]).double()
G = {a: H[:, a].T @ H[:, a] for a in range(L)}
cache = {}
def bridge(a, b, ridge=0.1):
    if (a, b) not in cache:
        X = H[:, a]; Y = H[:, b + 1] - X
        g = G[a]; lam = ridge * g.diagonal().mean()
        cache[(a, b)] = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), X.T @ Y).float()
    return cache[(a, b)]
def bridges_for(skipped):
    return {(a, b): bridge(a, b) for a, b in runs_of(set(skipped), L)}
sel = scorers("select")
def sel_cost(skipped):
    dn, cnt = 0.0, 0
    for i, sc in enumerate(sel):
        C = sc.text.steps
        if C <= 16: continue
        fn, _ = full("select", i, sc)
        plan = torch.zeros(L, C, dtype=torch.bool)
        for j in skipped: plan[j, 16:] = True
        n, _ = score(model, sc, plan, bridges_for(skipped))
        dn += float((n[16:] - fn[16:]).sum()); cnt += C - 16
    return dn / cnt
order = []
flex = list(range(2, 28))
for step in range(10):
    costs = {c: sel_cost(order + [c]) for c in flex if c not in order}
    best = min(costs, key=costs.get)
    order.append(best)
    print(step, "drop", best, f"{costs[best]:+.3f}", "runner-ups", sorted(costs.items(), key=lambda kv: kv[1])[1:4], f"{time.time()-t:.0f}s", flush=True)
print("greedy order", order)
print("importance   ", list(ORDERS["importance"][:10]))
exp1.ORDERS["greedy"] = tuple(order + [j for j in ORDERS["importance"] if j not in order])
for depth in [24, 21]:
    for o in ["importance", "greedy"]:
        br = bridges_for(ORDERS[o][: L - depth])
        print(f"{o:10} {depth} bridged", fmt(evaluate(o, depth, br, sets=EV)), f"{time.time()-t:.0f}s", flush=True)
    print(f"greedy     {depth} plain  ", fmt(evaluate("greedy", depth, {}, sets=EV)), flush=True)
