"""The four stages of a calibration, each a pass over text the model itself wrote (the package's docstring draws
them): its replies, the layer profile, the bridges, the schedule."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from d3cli.base.errors import UserError
from d3cli.core.decode.bridges import BridgeFitter
from d3cli.core.decode.engine import decode
from d3cli.core.model.loader import model_identity
from d3cli.core.model.model_facts import model_device, model_dtype, num_decoder_layers
from d3cli.core.session.plan import plan_for
from d3cli.core.session.settings import DecodeSettings
from d3cli.evaluation.builtin_prompts import encode_builtin, held_out_prompts
from d3cli.evaluation.calibrate.checkpoint import CalibrationCheckpoint
from d3cli.evaluation.calibrate.options import LATE_FROM, CalibrationOptions, Progress
from d3cli.evaluation.calibrate.schedule_choice import Budget, choose_schedule, expected_replies
from d3cli.evaluation.profile.layers import layer_profile_of, measure
from d3cli.evaluation.scoring import ContinuationScorer, ScoringText


def generate_corpus(loaded, prompts: Sequence[tuple[str, str]], options: CalibrationOptions,
                    progress: Progress, checkpoint: CalibrationCheckpoint | None = None) -> list[ScoringText]:
    """The model's greedy full-depth reply to each prompt (batched), as prompt + continuation; batches the
    `checkpoint` holds are taken from it, and each new one is added to it."""
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
    """The cost of skipping each layer alone from reply position LATE_FROM on (profile.layers.measure)."""
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


def choose_stage(loaded, calibration, options: CalibrationOptions, progress: Progress,
                 on_stage: Callable[[str, int], None], seconds: dict[str, float]) -> dict:
    """Stage 4: the schedule `calibration` (its order and bridges, activated on the model here) lets the model run
    within the budget (schedule_choice.choose_schedule), as the calibration file stores it."""
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

