"""`d3 calibrate`: make one model's calibration from its own words.

Four stages, each a pass over text the model itself wrote:

1. corpus    the model's greedy full-depth replies to d3's built-in prompts (profiles/calibration-prompts.json:
             chat questions of many kinds, and plain-text beginnings of prose, instructions, Q/A and code)
2. profile   the NLL cost of skipping each layer alone at late reply positions, on some of those replies: the
             layer profile behind the `importance` skip order
3. bridges   the full-depth hidden states of every reply; for each run of layers that the importance order skips at
             some depth, the ridge least-squares map from the run's input to the change it makes (bridges.py)
4. schedule  the model's replies to prompts held out from the bridges' fit, under candidate (α, min-layers) pairs
             with that order and those bridges, against its full-depth replies: the fastest pair whose replies stay
             within the fidelity budget is the model's schedule (schedule_choice.py)

Why the model's own replies: D3 skips layers while the model writes, so those are the hidden states a bridge must
stand in for; and a bridge learns its text's domain (fitted on GSM8K answers it halves the loss there but doubles it
on prose), so the built-in prompts are varied and the corpus is large (too few tokens for a d×d fit overfits: 3.8k
tokens made bridges worse than none on prose, 13k–27k help everywhere). docs/BRIDGES.md has the measurements.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from d3cli.base.errors import UserError, check_at_least
from d3cli.core.calibration.model_calibration import ModelCalibration
from d3cli.core.decode.bridges import DEFAULT_RIDGE, BridgeFitter, Bridges
from d3cli.evaluation.builtin_prompts import SCHEDULE_PROMPTS, builtin_prompts, encode_builtin, held_out_prompts
from d3cli.evaluation.schedule_choice import DEFAULT_NLL_BUDGET, SCHEDULE_TOKENS
from d3cli.evaluation.scoring import ScoringText

LATE_FROM = 16  # the layer profile and the bridges look at reply positions from here on, where D3 skips most


@dataclass(frozen=True)
class CalibrationOptions:
    prompts: int | None = 64  # how many of the built-in prompts (None: all 128)
    reply_tokens: int = 256  # most tokens per reply
    batch_size: int = 16  # replies generated at once
    profile_texts: int = 16  # replies the layer profile is measured on
    ridge: float = DEFAULT_RIDGE
    rank: int | None = None  # None: full-rank bridges
    head: int = 2  # the core layers the bridged runs avoid (as the schedule's defaults)
    tail: int = 2
    fewest_layers: int | None = None  # bridges for depths down to this (None: head + tail)
    budget: float = DEFAULT_NLL_BUDGET  # the chosen schedule's replies: at most this much NLL above full depth's
    schedule_prompts: int = SCHEDULE_PROMPTS  # held-out prompts the candidate schedules answer
    schedule_tokens: int = SCHEDULE_TOKENS  # most tokens per such reply

    def __post_init__(self) -> None:
        for name, value, least in (("--prompts", self.prompts, 1), ("--reply-tokens", self.reply_tokens, LATE_FROM + 2),
                                   ("--batch-size", self.batch_size, 1), ("--profile-texts", self.profile_texts, 1),
                                   ("--rank", self.rank, 1), ("--schedule-prompts", self.schedule_prompts, 1),
                                   ("--schedule-tokens", self.schedule_tokens, 8)):
            if value is not None:
                check_at_least(name, value, least)
        if not self.ridge > 0:
            raise UserError(f"--ridge must be above 0, not {self.ridge}")
        if not self.budget > 0:
            raise UserError(f"--budget must be above 0 nats per token, not {self.budget}")


Progress = Callable[[str, int], None]  # (stage, amount done since the last call)


class CalibrationCheckpoint:
    """What an unfinished calibration made, kept in d3's cache so that one interrupted (Ctrl-C, a crash) goes on
    where it stopped: the corpus stage's batches as they are made, the layer profile once measured, and the bridges
    once fitted (a calibration file without a schedule). Keyed by the model and every option they depend on, and
    removed once the calibration is written; only an unfinished stage is done again."""

    def __init__(self, identity: dict, options: CalibrationOptions):
        import hashlib

        from d3cli.base.paths import cache_home

        key = json.dumps({"model": identity, "prompts": options.prompts, "reply_tokens": options.reply_tokens,
                          "batch_size": options.batch_size}, sort_keys=True, default=str)
        self.path = cache_home() / "calibrations" / "partial" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        self.batches: dict[int, list[list]] = {}
        if self.path.is_file():
            try:
                self.batches = {int(start): texts for start, texts in json.loads(self.path.read_text()).items()}
            except (ValueError, AttributeError):
                self.batches = {}

    def save(self, start: int, texts: list[ScoringText]) -> None:
        from d3cli.base.files import write_atomically

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
        from d3cli.base.errors import UserError
        from d3cli.core.calibration.layer_profile import load_profile

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
        import hashlib

        key = json.dumps({name: fit[name] for name in ("ridge", "rank", "head", "tail", "fewest_layers",
                                                       "profile_texts", "drop_order", "runs")}, sort_keys=True)
        return self.path.with_name(f"{self.path.stem}-bridges-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
                                   ".safetensors")

    def bridges(self, fit: dict):
        """(bridges, tokens) an interrupted run fitted with `fit`'s order and options, or None."""
        from d3cli.base.errors import UserError
        from d3cli.core.calibration.model_calibration import read_calibration

        path = self.bridges_path(fit)
        if not path.is_file():
            return None
        try:
            kept = read_calibration(path)
        except UserError:
            return None
        return list(kept.bridges.values()), int(kept.fit["tokens"])

    def save_bridges(self, identity: dict, profile, bridges, fit: dict) -> None:
        from d3cli.core.calibration.model_calibration import write_calibration

        write_calibration(self.bridges_path(fit), identity, profile, bridges, fit)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        for kept in [*self.path.parent.glob(f"{self.path.stem}-profile-*.json"),
                     *self.path.parent.glob(f"{self.path.stem}-bridges-*.safetensors")]:
            kept.unlink(missing_ok=True)


def generate_corpus(loaded, prompts: Sequence[tuple[str, str]], options: CalibrationOptions,
                    progress: Progress, checkpoint: CalibrationCheckpoint | None = None) -> list[ScoringText]:
    """The model's greedy full-depth reply to each prompt (batched), as prompt + continuation; batches the
    `checkpoint` holds are taken from it, and each new one is added to it."""
    from d3cli.core.decode.engine import decode
    from d3cli.core.session.plan import plan_for
    from d3cli.core.session.settings import DecodeSettings

    full_depth = plan_for(loaded, DecodeSettings(max_new_tokens=options.reply_tokens).full_depth())  # greedy
    encoded = [encode_builtin(loaded.tokenizer, kind, text) for kind, text in prompts]
    texts = []
    for start in range(0, len(encoded), options.batch_size):
        batch = encoded[start:start + options.batch_size]
        done = checkpoint.texts(start) if checkpoint is not None else None
        if done is not None:
            progress("corpus", len(batch) * options.reply_tokens)
            texts += done
            continue
        made = []
        replies = decode(loaded, batch, full_depth, on_event=lambda event: progress("corpus", 1))
        for offset, (prompt_ids, reply) in enumerate(zip(batch, replies)):
            progress("corpus", options.reply_tokens - reply.generated_tokens)  # a reply that ended early
            if reply.generated_tokens > 1:
                made.append(ScoringText(f"builtin/{start + offset}", tuple(prompt_ids), tuple(reply.token_ids)))
        if checkpoint is not None:
            checkpoint.save(start, made)
        texts += made
    return texts


def measure_layer_profile(loaded, texts: Sequence[ScoringText], progress: Progress):
    """The cost of skipping each layer alone from reply position LATE_FROM on (profiling.measure)."""
    from d3cli.core.model.loader import model_identity
    from d3cli.core.model.model_facts import num_decoder_layers
    from d3cli.evaluation.profiling import layer_profile_of, measure

    long_enough = [text for text in texts if text.steps > LATE_FROM]
    if not long_enough:
        raise UserError(f"the model's replies are all shorter than {LATE_FROM + 1} tokens: nothing to calibrate on")
    found = measure(loaded.model, long_enough, {}, num_decoder_layers(loaded.model), layer_profile=True,
                    late_from=LATE_FROM, on_text=lambda: progress("profile", 1))
    return layer_profile_of(found, model_identity(loaded), "d3 built-in prompts, the model's own replies",
                            len(long_enough), LATE_FROM)


def fit_bridges(model, texts: Sequence[ScoringText], runs: Sequence[tuple[int, int]], options: CalibrationOptions,
                progress: Progress):
    """One bridge per run, fitted on the full-depth hidden states of every reply position from 1 on (position 0
    is the prefill's, which D3 never skips)."""
    from d3cli.core.model.model_facts import num_decoder_layers
    from d3cli.evaluation.scoring import ContinuationScorer

    num_layers = num_decoder_layers(model)
    hidden_size = int(model.config.get_text_config(decoder=True).hidden_size)
    fitter = BridgeFitter(runs, hidden_size)
    needed = {first for first, _ in runs} | {last + 1 for _, last in runs}
    for text in texts:
        states = {}

        def observe(layer, hidden_in, hidden_out):
            if layer in needed:
                states[layer] = hidden_in[0, 1:].detach().float().cpu()
            if layer == num_layers - 1 and num_layers in needed:
                states[num_layers] = hidden_out[0, 1:].detach().float().cpu()

        ContinuationScorer(model, text).score(None, observe)
        if states and next(iter(states.values())).shape[0]:
            fitter.add(states)
        progress("bridges", 1)
    return fitter.solve(options.ridge, options.rank), fitter.tokens


def check_fits(loaded, options: CalibrationOptions) -> int:
    """The model's layer count, once the options are known to fit it (a UserError if not)."""
    from d3cli.core.model.model_facts import num_decoder_layers

    num_layers = num_decoder_layers(loaded.model)
    if options.head + options.tail >= num_layers:
        raise UserError(f"head + tail ({options.head} + {options.tail}) leave no layer of {num_layers} to skip")
    return num_layers


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


@dataclass(frozen=True)
class StepCosts:
    """What a calibration's stages cost on this machine, measured once: a decode step at the batch size, and a
    forward over one reply's text."""

    step_s: float
    forward_s: float
    num_layers: int


def measure_costs(loaded, options: CalibrationOptions) -> StepCosts:
    """One short batch of replies timed now (its prefill and its decode steps)."""
    from d3cli.core.decode.engine import decode
    from d3cli.core.model.model_facts import num_decoder_layers
    from d3cli.core.session.plan import plan_for
    from d3cli.core.session.settings import DecodeSettings

    batch = min(options.batch_size, len(builtin_prompts(options.prompts)))
    probe = encode_builtin(loaded.tokenizer, *builtin_prompts(1)[0])
    steps = 4
    plan = plan_for(loaded, DecodeSettings(max_new_tokens=steps + 1).full_depth())
    times = []
    started = time.perf_counter()
    decode(loaded, [probe] * batch, plan, on_event=lambda event: times.append(time.perf_counter()))
    prefill_s = times[0] - started  # the batch's prompts, then each row's first token
    step_s = max(1e-4, (times[-1] - times[batch - 1]) / steps) if len(times) > batch else prefill_s
    forward_s = prefill_s / (batch * len(probe)) * (options.reply_tokens + len(probe))
    return StepCosts(step_s, forward_s, num_decoder_layers(loaded.model))


def estimate_from(costs: StepCosts, options: CalibrationOptions, schedule_only: bool = False) -> dict[str, float]:
    """About how long each stage takes: the replies (batches × reply tokens × a step), the layer profile (a forward
    per text and about L/2 more for its skip-alone passes), the bridges (a forward per text) and the schedule (an
    upper bound: every candidate's replies, as its progress bar counts them)."""
    from d3cli.evaluation.schedule_choice import expected_replies

    prompts = len(builtin_prompts(options.prompts))
    held_out = options.schedule_prompts
    schedule = expected_replies(held_out, costs.num_layers - options.head - options.tail) / min(
        options.batch_size, held_out) * options.schedule_tokens * costs.step_s
    if schedule_only:
        return {"schedule": schedule}
    return {
        "corpus": -(-prompts // options.batch_size) * options.reply_tokens * costs.step_s,
        "profile": min(options.profile_texts, prompts) * (costs.num_layers / 2 + 1) * costs.forward_s,
        "bridges": prompts * costs.forward_s,
        "schedule": schedule,
    }


SMALLEST = {"prompts": 8, "profile_texts": 4, "schedule_prompts": 4}  # below these a calibration says little
TIME_LIMITED = {"prompts": "prompts the bridges are fitted on", "profile_texts": "replies the layer profile is "
                "measured on", "schedule_prompts": "held-out prompts the schedule is chosen on"}


def within_time(costs: StepCosts, options: CalibrationOptions, seconds: float,
                schedule_only: bool = False) -> CalibrationOptions:
    """`options` made smaller, the same fraction of each of prompts, profile texts and held-out prompts (never below
    SMALLEST), until the estimate fits `seconds`: the options themselves when they fit. A UserError when even the
    smallest calibration does not fit."""
    import dataclasses

    full = {"prompts": len(builtin_prompts(options.prompts)), "profile_texts": options.profile_texts,
            "schedule_prompts": options.schedule_prompts}
    fraction = 1.0
    while True:
        sizes = {name: max(min(SMALLEST[name], value), round(value * fraction)) for name, value in full.items()}
        smaller = dataclasses.replace(options, **sizes)
        total = sum(estimate_from(costs, smaller, schedule_only).values())
        if total <= seconds:
            return smaller
        if all(sizes[name] <= SMALLEST[name] for name in sizes if full[name] > SMALLEST[name]):
            listed = ", ".join(f"{value} {name.replace('_', ' ')}" for name, value in sizes.items())
            raise UserError(f"--time-limit {_minutes(seconds)}: even the smallest calibration ({listed}) takes about "
                            f"{_minutes(total)} here: give at least {_minutes(total * 1.1)}, or fewer --reply-tokens")
        fraction *= 0.9


def time_limit_cost(options: CalibrationOptions, limited: CalibrationOptions) -> str:
    """What a time limit cost: the sizes it cut, and what that weakens (empty when it cut nothing)."""
    before = {name: len(builtin_prompts(options.prompts)) if name == "prompts" else getattr(options, name)
              for name in TIME_LIMITED}
    cuts = [f"{getattr(limited, name)} of {before[name]} {label}" for name, label in TIME_LIMITED.items()
            if getattr(limited, name) != before[name]]
    if not cuts:
        return ""
    return (f"{'; '.join(cuts)}: bridges fitted on fewer tokens are weaker (and may overfit), and a schedule chosen "
            "on fewer replies is less certain to hold on others")


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "30m", "2h" or "1h30m"; a UserError otherwise."""
    import re

    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or match is None or not any(match.groups()):
        raise UserError(f"--time-limit takes a duration such as 90s, 30m, 2h or 1h30m, not {text!r}")
    hours, minutes, seconds = (float(group) if group else 0.0 for group in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise UserError(f"--time-limit must be above zero, not {text!r}")
    return total


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def calibrate(loaded, options: CalibrationOptions, output: Path | None, progress: Progress,
              on_stage: Callable[[str, int], None] = lambda stage, total: None) -> CalibrationResult:
    """Make the model's calibration and write it to `output` (default: the user cache, where commands find it).
    `on_stage(stage, total)` announces each stage and its amount of work; `progress(stage, amount)` reports it."""
    from d3cli.core.calibration.layer_profile import importance_order
    from d3cli.core.calibration.model_calibration import cache_path, write_calibration
    from d3cli.core.decode.schedule import runs_of_drop_order
    from d3cli.core.model.loader import model_identity

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


def choose_stage(loaded, calibration, options: CalibrationOptions, progress: Progress,
                 on_stage: Callable[[str, int], None], seconds: dict[str, float]) -> dict:
    """Stage 4: the schedule `calibration` (its order and bridges, activated on the model here) lets the model run
    within the budget (schedule_choice.choose_schedule), as the calibration file stores it."""
    from d3cli.core.model.model_facts import model_device, model_dtype, num_decoder_layers
    from d3cli.core.session.settings import DecodeSettings
    from d3cli.evaluation.schedule_choice import Budget, choose_schedule, expected_replies

    started = time.perf_counter()
    calibration.activate(model_device(loaded.model), model_dtype(loaded.model))
    prompts = held_out_prompts(options.schedule_prompts)
    num_layers = num_decoder_layers(loaded.model)
    on_stage("schedule", expected_replies(len(prompts), num_layers - options.head - options.tail))
    settings = DecodeSettings(head=options.head, tail=options.tail, skip_order="importance")
    choice = choose_schedule(loaded._replace(calibration=calibration), settings, prompts, Budget(options.budget),
                             options.schedule_tokens, options.batch_size, progress)
    seconds["schedule"] = time.perf_counter() - started
    return choice.as_dict()


def choose_only(loaded, options: CalibrationOptions, output: Path | None, progress: Progress,
                on_stage: Callable[[str, int], None] = lambda stage, total: None) -> CalibrationResult:
    """`d3 calibrate --schedule-only`: choose the schedule again for the model's calibration as it is (its order
    and bridges, e.g. with another --budget), and write the calibration with it to `output` (default: the user
    cache)."""
    from d3cli.core.calibration.model_calibration import cache_path, write_calibration
    from d3cli.core.model.loader import model_identity

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
                             bridge_bytes=sum(bridge.nbytes() for bridge in calibration.bridges.values()), schedule=choice)
