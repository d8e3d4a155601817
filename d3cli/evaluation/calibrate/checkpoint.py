"""An unfinished calibration's work, kept in d3's cache so that an interrupted one goes on where it stopped."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from d3cli.base.errors import UserError
from d3cli.base.files import write_atomically
from d3cli.base.paths import cache_home
from d3cli.core.calibration.layer_profile import load_profile
from d3cli.core.calibration.model_calibration import read_calibration, write_calibration
from d3cli.evaluation.builtin_prompts import builtin_prompts
from d3cli.evaluation.calibrate.options import CalibrationOptions
from d3cli.evaluation.scoring import ScoringText


class CalibrationCheckpoint:
    """What an unfinished calibration made, kept in d3's cache so that one interrupted (Ctrl-C, a crash) goes on
    where it stopped: the corpus stage's batches as they are made, the layer profile once measured, and the bridges
    once fitted (a calibration file without a schedule). Keyed by the model and every option they depend on, and
    removed once the calibration is written; only an unfinished stage is done again."""

    def __init__(self, identity: dict, options: CalibrationOptions):
        key = json.dumps({"model": identity, "prompts": options.prompts, "reply_tokens": options.reply_tokens,
                          "batch_size": options.batch_size,
                          "prompt_texts": builtin_prompts(options.prompts)},  # another d3's prompts: start afresh
                         sort_keys=True, default=str)
        self.path = cache_home() / "calibrations" / "partial" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        self.batches: dict[int, list[list]] = {}
        if self.path.is_file():
            try:
                self.batches = {int(start): texts for start, texts in json.loads(self.path.read_text()).items()}
            except (ValueError, AttributeError):
                self.batches = {}

    def save(self, start: int, texts: list[ScoringText]) -> None:
        self.batches[start] = [[text.id, list(text.prompt_ids), list(text.continuation_ids)] for text in texts]
        write_atomically(self.path, json.dumps(self.batches), make_parents=True)

    def texts(self, start: int) -> list[ScoringText] | None:
        found = self.batches.get(start)
        return None if found is None else [ScoringText(name, tuple(ids), tuple(reply)) for name, ids, reply in found]

    def profile_path(self, texts: int) -> Path:
        """Where the profile stage's layer profile of `texts` replies is kept (it depends on the replies too)."""
        return self.path.with_name(f"{self.path.stem}-profile-{texts}.json")

    def profile(self, texts: int):
        """The layer profile an interrupted run measured on the first `texts`-reply sample, or None."""
        path = self.profile_path(texts)
        if not path.is_file():
            return None
        try:
            return load_profile(path)
        except UserError:
            return None

    def save_profile(self, profile, texts: int) -> None:
        self.profile_path(texts).parent.mkdir(parents=True, exist_ok=True)
        profile.save(self.profile_path(texts))

    def bridges_path(self, fit: dict) -> Path:
        """Where the bridges stage's bridges are kept, keyed by everything they depend on beyond the replies."""
        key = json.dumps({name: fit[name] for name in ("ridge", "rank", "head", "tail", "fewest_layers",
                                                       "profile_texts", "drop_order", "runs")}, sort_keys=True)
        return self.path.with_name(f"{self.path.stem}-bridges-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
                                   ".safetensors")

    def bridges(self, fit: dict):
        """(bridges, tokens) an interrupted run fitted with `fit`'s order and options, or None."""
        path = self.bridges_path(fit)
        if not path.is_file():
            return None
        try:
            kept = read_calibration(path)
        except UserError:
            return None
        return list(kept.bridges.values()), int(kept.fit["tokens"])

    def save_bridges(self, identity: dict, profile, bridges, fit: dict) -> None:
        write_calibration(self.bridges_path(fit), identity, profile, bridges, fit)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        for kept in [*self.path.parent.glob(f"{self.path.stem}-profile-*.json"),
                     *self.path.parent.glob(f"{self.path.stem}-bridges-*.safetensors")]:
            kept.unlink(missing_ok=True)

