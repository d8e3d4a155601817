"""A measured layer profile and the `importance` skip order built from it. No torch here.

For each decoder layer the profile holds its block influence (1 − cosine similarity of the layer's input and output
hidden states, averaged over late positions) and the NLL increase when that layer alone is skipped for late positions.
`d3 profile-ppl --save-profile FILE` writes it with the model's identity; `--skip-order importance --profile FILE`
drops the flex layers whose removal cost least first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from d3cli.base.errors import UserError
from d3cli.base.files import write_atomically
from d3cli.base.paths import BUNDLED

PROFILE_FORMAT = "d3-layer-profile/1"
# The embedded SmolLM2-135M-Instruct's profile measured on 32 GSM8K reference answers (docs/PROFILE.md). The order d3
# uses by default comes from the model's calibration (model_calibration.py), measured on the model's own replies.
BUNDLED_PROFILE = BUNDLED / "smollm2-135m-instruct.json"
FINGERPRINT_TOLERANCE = 1e-2  # relative; survives a dtype change, not a different model


@dataclass(frozen=True)
class LayerScore:
    layer: int
    block_influence: float
    nll_increase: float


@dataclass(frozen=True)
class LayerProfile:
    model: dict  # model_identity(): name, model_type, num_layers, hidden_size, vocab_size, fingerprint
    corpus: str
    texts: int
    late_from: int
    layers: tuple[LayerScore, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def importance_ranking(self) -> list[int]:
        """Every layer, least important first: by the NLL increase of skipping it, then by block influence."""
        return [score.layer for score in sorted(self.layers, key=lambda s: (s.nll_increase, s.block_influence,
                                                                              s.layer))]

    def as_dict(self) -> dict:
        return {"format": PROFILE_FORMAT, "model": self.model, "corpus": self.corpus, "texts": self.texts,
                "late_from": self.late_from, "layers": [asdict(score) for score in self.layers],
                "importance_ranking": self.importance_ranking()}

    def save(self, path: Path) -> None:
        write_atomically(Path(path), json.dumps(self.as_dict(), indent=2) + "\n")


def importance_order(profile: LayerProfile):
    """A skip order (flex layers in, drop order out) that drops the least important flex layers first."""
    rank = {layer: position for position, layer in enumerate(profile.importance_ranking())}

    def drop_least_important_first(flex_layers: Sequence[int]) -> list[int]:
        missing = [layer for layer in flex_layers if layer not in rank]
        if missing:
            raise UserError(f"the layer profile has no layer {missing[0]}: it was measured on another model")
        return sorted(flex_layers, key=lambda layer: rank[layer])

    return drop_least_important_first


@lru_cache(maxsize=8)
def _read_profile(path: str, modified_ns: int) -> LayerProfile:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read the layer profile {path}: {getattr(error, 'strerror', None) or error}") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})") from None
    try:
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {PROFILE_FORMAT!r}")
        layers = tuple(LayerScore(int(row["layer"]), float(row["block_influence"]), float(row["nll_increase"]))
                       for row in data["layers"])
        if [score.layer for score in layers] != list(range(len(layers))) or not layers:
            raise ValueError("layers must list every layer once, in order")
        if any(math.isnan(score.nll_increase) for score in layers):
            raise ValueError("an NLL increase is not a number")
        return LayerProfile(model=dict(data["model"]), corpus=str(data.get("corpus", "")),
                            texts=int(data.get("texts", 0)), late_from=int(data.get("late_from", 0)), layers=layers)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path} is not a d3 layer profile (from d3 profile-ppl --save-profile): {error}") from None


def load_profile(path: str | Path) -> LayerProfile:
    """The layer profile in `path`; a missing or malformed file is a UserError naming it."""
    path = Path(path).expanduser()
    try:
        modified_ns = path.stat().st_mtime_ns
    except OSError as error:
        raise UserError(f"cannot read the layer profile {path}: {error.strerror}") from None
    return _read_profile(str(path), modified_ns)


def profile_mismatch(profile: LayerProfile, identity: dict) -> str | None:
    """Why `profile` was not measured on the model with `identity` (layer count, architecture, weights), or None."""
    if profile.num_layers != identity["num_layers"]:
        return f"it is for a model with {profile.num_layers} layers, {identity['name']} has {identity['num_layers']}"
    return identity_mismatch(profile.model, identity)


def identity_mismatch(recorded: dict, identity: dict) -> str | None:
    """Why a file made for the model `recorded` (a `loader.model_identity`) does not fit the model with `identity`:
    another layer count, architecture, hidden or vocabulary size, or other weights (the fingerprint); else None."""
    if "num_layers" in recorded and recorded["num_layers"] != identity["num_layers"]:
        return (f"it is for a model with {recorded['num_layers']} layers, {identity['name']} has "
                f"{identity['num_layers']}")
    for key in ("model_type", "hidden_size", "vocab_size"):
        if key in recorded and recorded[key] != identity.get(key):
            return (f"it was made for {recorded.get('name')} ({key} {recorded[key]}), not for {identity['name']} "
                    f"({key} {identity.get(key)})")
    expected, actual = recorded.get("fingerprint"), identity.get("fingerprint")
    if expected is not None and actual is not None:
        if abs(expected - actual) > FINGERPRINT_TOLERANCE * max(abs(expected), abs(actual), 1e-12):
            return f"it was made for {recorded.get('name')}, whose weights differ from {identity['name']}'s"
    return None


def check_profile_matches(profile: LayerProfile, identity: dict, path: str | Path) -> None:
    """A profile measured on another model is a UserError that says how to make the right one."""
    reason = profile_mismatch(profile, identity)
    if reason is None:
        return
    raise UserError(f"the layer profile {path} does not fit this model: {reason}; make one with d3 profile-ppl "
                    "--save-profile FILE")
