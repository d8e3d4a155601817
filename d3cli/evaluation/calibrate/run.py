"""`d3 calibrate`: the stages in order, each resumed from the checkpoint when an interrupted run finished it, and the
calibration file written at the end (`calibrate`); `--schedule-only` chooses the schedule again (`choose_only`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from d3cli.base.errors import UserError
from d3cli.core.calibration.layer_profile import importance_order
from d3cli.core.calibration.model_calibration import ModelCalibration, cache_path, write_calibration
from d3cli.core.decode.bridges import Bridges
from d3cli.core.decode.schedule import runs_of_drop_order
from d3cli.core.model.loader import model_identity
from d3cli.evaluation.builtin_prompts import builtin_prompts
from d3cli.evaluation.calibrate.checkpoint import CalibrationCheckpoint
from d3cli.evaluation.calibrate.options import LATE_FROM, CalibrationOptions, Progress, check_fits
from d3cli.evaluation.calibrate.stages import choose_stage, fit_bridges, generate_corpus, measure_layer_profile


@dataclass
class CalibrationResult:
    path: Path
    texts: int
    tokens: int
    runs: list[tuple[int, int]]
    drop_order: list[int]
    seconds: dict[str, float]
    bridge_bytes: int
    schedule: dict | None = None  # schedule_choice.ScheduleChoice.as_dict()


def calibrate(loaded, options: CalibrationOptions, output: Path | None, progress: Progress,
              on_stage: Callable[[str, int], None] = lambda stage, total: None) -> CalibrationResult:
    """Make the model's calibration and write it to `output` (default: the user cache, where commands find it).
    `on_stage(stage, total)` announces each stage and its amount of work; `progress(stage, amount)` reports it."""
    num_layers = check_fits(loaded, options)
    fewest = options.fewest_layers if options.fewest_layers is not None else options.head + options.tail
    identity = model_identity(loaded)
    prompts = builtin_prompts(options.prompts)
    seconds = {}

    started = time.perf_counter()
    on_stage("corpus", len(prompts) * options.reply_tokens)
    checkpoint = CalibrationCheckpoint(identity, options)
    texts = generate_corpus(loaded, prompts, options, progress, checkpoint)
    seconds["corpus"] = time.perf_counter() - started

    started = time.perf_counter()
    profile_texts = texts[:: max(1, len(texts) // options.profile_texts)][:options.profile_texts]
    profile = checkpoint.profile(len(profile_texts))  # measured by a run interrupted after this stage
    on_stage("profile", 0 if profile is not None else sum(1 for text in profile_texts if text.steps > LATE_FROM))
    if profile is None:
        profile = measure_layer_profile(loaded, profile_texts, progress)
        checkpoint.save_profile(profile, len(profile_texts))
    seconds["profile"] = time.perf_counter() - started

    started = time.perf_counter()
    flex = list(range(options.head, num_layers - options.tail))
    drop_order = importance_order(profile)(flex)
    runs = list(runs_of_drop_order(num_layers, drop_order, fewest))
    fit = {**asdict(options), "fewest_layers": fewest, "corpus": "d3 built-in prompts, the model's own greedy replies",
           "texts": len(texts), "skip_order": "importance", "drop_order": list(drop_order),
           "runs": [list(run) for run in runs]}
    kept = checkpoint.bridges(fit)  # fitted by a run interrupted in the schedule stage
    on_stage("bridges", 0 if kept is not None else len(texts))
    if kept is not None:
        bridges, tokens = kept
    else:
        bridges, tokens = fit_bridges(loaded.model, texts, runs, options, progress)
        checkpoint.save_bridges(identity, profile, bridges, {**fit, "tokens": tokens})
    fit["tokens"] = tokens
    seconds["bridges"] = time.perf_counter() - started

    path = Path(output) if output is not None else cache_path(identity)
    calibration = ModelCalibration(path=path, model=identity, profile=profile, fit=fit,
                                   bridges=Bridges(bridges, str(path)))
    choice = choose_stage(loaded, calibration, options, progress, on_stage, seconds)
    fit["seconds"] = {key: round(value, 1) for key, value in seconds.items()}
    write_calibration(path, identity, profile, bridges, fit, choice)
    checkpoint.remove()
    return CalibrationResult(path=path, texts=len(texts), tokens=tokens, runs=runs, drop_order=list(drop_order),
                             seconds=seconds, bridge_bytes=sum(bridge.nbytes() for bridge in bridges),
                             schedule=choice)


def choose_only(loaded, options: CalibrationOptions, output: Path | None, progress: Progress,
                on_stage: Callable[[str, int], None] = lambda stage, total: None) -> CalibrationResult:
    """`d3 calibrate --schedule-only`: choose the schedule again for the model's calibration as it is (its order
    and bridges, e.g. with another --budget), and write the calibration with it to `output` (default: the user
    cache)."""
    calibration = loaded.calibration
    if calibration is None:
        raise UserError("--schedule-only needs the model's calibration: make one with d3 calibrate (without "
                        "--schedule-only), or pass --calibration FILE")
    if calibration.profile is None:
        raise UserError(f"the calibration {calibration.label} has no layer profile: make a new one with d3 calibrate")
    check_fits(loaded, options)
    seconds: dict[str, float] = {}
    choice = choose_stage(loaded, calibration, options, progress, on_stage, seconds)
    path = Path(output) if output is not None else cache_path(model_identity(loaded))
    fit = {**calibration.fit, "schedule_seconds": round(seconds["schedule"], 1)}
    write_calibration(path, calibration.model, calibration.profile, list(calibration.bridges.values()), fit, choice)
    runs = [tuple(run) for run in calibration.fit.get("runs", [])]
    return CalibrationResult(path=path, texts=int(calibration.fit.get("texts", 0)),
                             tokens=int(calibration.fit.get("tokens", 0)), runs=runs,
                             drop_order=list(calibration.fit.get("drop_order", [])), seconds=seconds,
                             bridge_bytes=sum(bridge.nbytes() for bridge in calibration.bridges.values()),
                             schedule=choice)

