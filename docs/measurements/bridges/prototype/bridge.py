import torch

from d3cli.core.model.model_facts import find_decoder_layers


def capture(model, text):
    """Full-depth hidden states at the segment positions: [C, L+1, d] (input of each layer, then last output)."""
    from d3cli.evaluation.scoring import ContinuationScorer
    L = len(find_decoder_layers(model))
    st = {}
    def observe(j, hin, hout):
        st[j] = hin[0].float().clone()
        if j == L - 1:
            st[L] = hout[0].float().clone()
    sc = ContinuationScorer(model, text)
    sc.score(None, observe)
    return torch.stack([st[j] for j in range(L + 1)], dim=1)

def runs_of(skipped_set, L):
    runs, start = [], None
    for j in range(L):
        if j in skipped_set:
            if start is None: start = j
        elif start is not None:
            runs.append((start, j - 1)); start = None
    if start is not None: runs.append((start, L - 1))
    return runs

def fit(H, a, b, ridge=1e-3, weight="norm", outlier=None, bias=False, rank=None):
    X = H[:, a].double(); Y = (H[:, b + 1] - H[:, a]).double()
    n = X.norm(dim=1, keepdim=True)
    if outlier is not None:
        keep = (n[:, 0] < outlier * n.median()); X, Y, n = X[keep], Y[keep], n[keep]
    if weight == "norm":
        X, Y = X / n, Y / n
    if bias:
        X = torch.cat([X, torch.ones_like(X[:, :1]) * (1.0 if weight != "norm" else 1.0)], 1)
    G = X.T @ X
    lam = ridge * G.diagonal().mean()
    W = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), X.T @ Y)
    if rank is not None:
        U, S, Vh = torch.linalg.svd(W[:H.shape[2]], full_matrices=False)
        W = torch.cat([(U[:, :rank] * S[:rank]) @ Vh[:rank], W[H.shape[2]:]], 0)
    return W.float()

class Bridged:
    """Hooks: per position plan skip (out := in) and bridges at each run's last layer."""
    def __init__(self, model, plan, bridges, bias=False):
        self.layers = find_decoder_layers(model); self.plan = plan; self.bridges = bridges; self.bias = bias
        L, C = plan.shape
        start = torch.full((L, C), -1, dtype=torch.long)
        for j in range(L):
            prev = start[j - 1] if j else torch.full((C,), -1, dtype=torch.long)
            cont = plan[j - 1] if j else torch.zeros(C, dtype=torch.bool)
            start[j] = torch.where(plan[j], torch.where(cont, prev, torch.full_like(prev, j)), torch.full_like(prev, -1))
        self.ends = {}
        for j in range(L):
            nxt = plan[j + 1] if j + 1 < L else torch.zeros(C, dtype=torch.bool)
            endmask = plan[j] & ~nxt
            if endmask.any():
                groups = {}
                for p in endmask.nonzero()[:, 0].tolist():
                    groups.setdefault(int(start[j, p]), []).append(p)
                self.ends[j] = {a: torch.tensor(ps) for a, ps in groups.items()}
    def hook(self, j):
        def h(module, args, kwargs, output):
            hout = output[0] if isinstance(output, tuple) else output
            hin = args[0] if args else kwargs["hidden_states"]
            rep = torch.where(self.plan[j][None, :, None], hin, hout)
            for a, ps in self.ends.get(j, {}).items():
                W = self.bridges.get((a, j))
                if W is None: continue
                x = hin[0, ps]
                if self.bias:
                    delta = x @ W[:-1] + W[-1]
                else:
                    delta = x @ W
                rep = rep.clone(); rep[0, ps] = x + delta
            return (rep, *output[1:]) if isinstance(output, tuple) else rep
        return h
    def __enter__(self):
        self.handles = [l.register_forward_hook(self.hook(j), with_kwargs=True) for j, l in enumerate(self.layers)]
        return self
    def __exit__(self, *a):
        for h in self.handles: h.remove()

def score(model, scorer, plan, bridges=None, bias=False):
    """(nll[C], top[C]) under plan with bridges (dict (a,b)->W) via hooks."""
    from d3cli.core.decode.engine import cache_argument
    cache = scorer._prefilled_cache()
    with Bridged(model, plan, bridges or {}, bias):
        out = model(input_ids=scorer.segment_ids, position_ids=scorer.segment_positions, **cache_argument(model, cache), use_cache=cache is not None)
    lp = torch.log_softmax(out.logits[0].float(), -1)
    return -lp.gather(-1, scorer.targets[:, None])[:, 0], lp.argmax(-1)

def static_plan(L, drop_order, depth, C, from_pos=16):
    plan = torch.zeros(L, C, dtype=torch.bool)
    for j in drop_order[: L - depth]:
        plan[j, from_pos:] = True
    return plan

def fit_xy(X, Y, ridge=1e-2):
    X = X.double(); Y = Y.double()
    G = X.T @ X
    lam = ridge * G.diagonal().mean()
    return torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), X.T @ Y).float()
