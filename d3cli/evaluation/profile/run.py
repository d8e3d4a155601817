"""`d3 profile-ppl`'s run: pick the texts, score them at full depth and under D3, and, when asked, measure the layer
profile and recommend α and the floor. Progress is reported as short status lines; rendering is the CLI's."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from d3cli.base.errors import UserError
from d3cli.core.model.loader import model_identity
from d3cli.core.model.model_facts import context_length, num_decoder_layers
from d3cli.core.session.plan import plan_for
from d3cli.core.session.settings import DecodeSettings
from d3cli.evaluation.profile import corpus, layers
from d3cli.evaluation.profile.recommend import recommend_and_check

Status = Callable[[str], None]


@dataclass(frozen=True)
class Corpus:
    """Which texts are scored: documents of a file, or a task's prompts followed by their reference answers or by
    the model's own greedy continuations."""

    name: str
    text_file: Path | None = None
    examples: Sequence = ()
    self_generated: bool = False
    stop_strings: tuple[str, ...] = ()
    prompt_tokens: int = 64  # with a text file: the tokens of each document that form its prompt
    limit: int | None = None

    @classmethod
    def of_task(cls, task, examples: Sequence, self_generated: bool) -> Corpus:
        kind = "own greedy continuations" if self_generated else "reference answers"
        return cls(f"{task.name} {kind}", examples=examples, self_generated=self_generated,
                   stop_strings=tuple(task.stop_strings))

    def texts(self, loaded, max_positions: int, on_status: Status) -> list:
        """The scoring texts for `loaded` (a UserError when there are none)."""
        context = context_length(loaded.model)
        if self.text_file is not None:
            texts = corpus.file_texts(loaded.tokenizer, self.text_file, self.prompt_tokens, max_positions, context,
                                      self.limit)
        elif self.self_generated:
            on_status("generating the model's own continuations")
            done = iter(range(1, len(self.examples) + 1))
            texts = corpus.self_texts(loaded, self.examples, self.stop_strings, max_positions, context,
                                      on_text=lambda: on_status(f"generating continuations: {next(done)}/"
                                                                f"{len(self.examples)}"))
        else:
            texts = corpus.reference_texts(loaded.tokenizer, self.examples, max_positions, context)
        if not texts:
            raise UserError(f"no text to score in {self.name}")
        return texts


@dataclass(frozen=True)
class ProfileOptions:
    max_positions: int = 256
    bucket_size: int = 16
    layers: bool = False  # measure the layer profile too
    late_from: int = 16
    save_profile: Path | None = None
    target_speedup: float | None = None
    target_layer_ratio: float | None = None
    reply_tokens: int = 128

    @property
    def calibrate(self) -> bool:
        return self.target_speedup is not None or self.target_layer_ratio is not None


def profile(loaded, corpus: Corpus, settings: DecodeSettings, alphas: Sequence[float], options: ProfileOptions,
            on_status: Status = lambda message: None) -> dict:
    """Everything profile-ppl reports, as one JSON-ready dict: the per-position profile (full depth and each α),
    the layer profile (written to `options.save_profile` when given), the calibration's recommendation."""
    num_layers = num_decoder_layers(loaded.model)
    schedules = {f"α={value:g}": plan_for(loaded, dataclasses.replace(settings, alpha=value)).schedule
                 for value in alphas}
    base_schedule = plan_for(loaded, settings).schedule
    texts = corpus.texts(loaded, options.max_positions, on_status)

    on_status(f"scoring {len(texts)} texts")
    done = iter(range(1, len(texts) + 1))
    found = layers.measure(loaded.model, texts, schedules, num_layers, layer_profile=options.layers,
                              late_from=options.late_from,
                              on_text=lambda: on_status(f"scoring texts: {next(done)}/{len(texts)}"))
    result = {"model": loaded.name, "corpus": corpus.name, "num_layers": num_layers,
              "calibration": loaded.calibration.label if loaded.calibration is not None else None,
              "skip_order": base_schedule.skip_order, "bridges": base_schedule.bridge_maps is not None,
              "profile": layers.report(found, schedules, options.bucket_size, options.max_positions)}
    if options.layers:
        layer_profile = layers.layer_profile_of(found, model_identity(loaded), corpus.name, len(texts),
                                                   options.late_from)
        result["late_from"] = options.late_from
        result["layers"] = layers.layer_rows(layer_profile, base_schedule.head, base_schedule.tail)
        result["importance_ranking"] = layer_profile.importance_ranking()
        if options.save_profile is not None:
            layer_profile.save(options.save_profile)
            result["saved_profile"] = str(options.save_profile)
    if options.calibrate:
        on_status("calibrating")
        result["recommendation"] = recommend_and_check(loaded.model, texts, base_schedule, options.reply_tokens,
                                                       options.target_speedup, options.target_layer_ratio, on_status)
    return result
