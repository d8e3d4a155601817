"""profile-ppl's files: the per-position profile as CSV, and as a PNG chart (matplotlib, the optional `plot` extra)."""

from __future__ import annotations

import csv
import importlib.util
import io
import math
from pathlib import Path

from d3cli.base.errors import UserError
from d3cli.base.files import write_atomically


def profile_csv(profile: dict) -> str:
    """One row per position bucket: the full-depth profile, the fit, and each D3 schedule's NLL and increase."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    labels = [decayed["label"] for decayed in profile["d3"]]
    writer.writerow(["first", "last", "tokens", "mean_nll", "nll_low", "nll_high", "perplexity", "perplexity_low",
                     "perplexity_high", "fit", *[f"{kind} {label}" for label in labels
                                                 for kind in ("mean_nll", "nll_increase")]])
    for index, row in enumerate(profile["buckets"]):
        decayed = [value for item in profile["d3"] for value in (item["buckets"][index]["mean_nll"],
                                                                  item["buckets"][index]["nll_increase"])]
        writer.writerow([row["first"], row["last"], row["count"], *(_number(row[key]) for key in (
            "mean_nll", "nll_low", "nll_high", "perplexity", "perplexity_low", "perplexity_high")),
            "" if row["fit"] is None else _number(row["fit"]), *(_number(value) for value in decayed)])
    return buffer.getvalue()


def _number(value: float) -> str:
    return f"{value:.6g}"


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib: pip install 'd3cli[plot]' (or pip install matplotlib)")


def write_csv(path: Path, profile: dict) -> None:
    write_atomically(path, profile_csv(profile))


def write_plot(path: Path, result: dict) -> None:
    """The perplexity profile with its 95% intervals, the fit and each D3 schedule; the layer profile beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profile = result["profile"]
    panels = 2 if "layers" in result else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    left = axes[0][0]
    middles = [(row["first"] + row["last"]) / 2 for row in profile["buckets"]]
    ppl = [row["perplexity"] for row in profile["buckets"]]
    errors = [[p - row["perplexity_low"] for p, row in zip(ppl, profile["buckets"])],
              [row["perplexity_high"] - p for p, row in zip(ppl, profile["buckets"])]]
    left.errorbar(middles, ppl, yerr=errors, fmt="o", capsize=3, label="full depth (95% CI)")
    fit = profile["fit"]
    if fit:
        xs = list(range(int(profile["buckets"][-1]["last"]) + 1))
        left.plot(xs, [fit["c"] + fit["a"] * (x + 1) ** (-fit["b"]) for x in xs],
                  label=f"fit {fit['c']:.2f} + {fit['a']:.2f}(i+1)^-{fit['b']:.2f}, R² {fit['r2']:.2f}")
    for decayed in profile["d3"]:
        left.plot(middles, [math.exp(bucket["mean_nll"]) for bucket in decayed["buckets"]], marker=".",
                  label=f"D3 {decayed['label']}")
    left.set_xlabel("position after the prompt")
    left.set_ylabel("perplexity")
    left.set_title(f"{result['model']} · {result['corpus']}", fontsize=9)
    left.legend(fontsize=8)
    if panels == 2:
        right = axes[0][1]
        rows = result["layers"]
        right.bar([row["layer"] for row in rows], [row["nll_increase"] for row in rows],
                  color=["grey" if row["core"] else "tab:blue" for row in rows])
        right.set_xlabel("layer (grey: core)")
        right.set_ylabel(f"ΔNLL when skipped at positions ≥ {result['late_from']}")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    write_atomically(path, buffer.getvalue())
