import sys; sys.path.insert(0, str(__import__('pathlib').Path(__file__).parent))
from exp1 import *

for c in ["self", "gsm_train", "bbh_cal", "prose_cal"]:
    states(c)
t = time.time()
for order in ["middle", "importance"]:
    print(order, 24, "plain      ", fmt(evaluate(order, 24, {})), f"{time.time()-t:.0f}s", flush=True)
    for c in ["self", "gsm_train"]:
        H = states(c)["H"]
        for w in ["none", "norm"]:
            for r in [1e-3, 1e-2]:
                br = fit_all(H, order, 24, weight=w, ridge=r)
                print(order, 24, f"{c[:9]:9} {w} {r:g}", fmt(evaluate(order, 24, br)), f"{time.time()-t:.0f}s", flush=True)
