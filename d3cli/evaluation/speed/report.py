"""`d3 bench --task speed`: every timing of steps.py on one loaded model, gathered into one JSON-ready report.

The first-token timings start new `d3 generate` processes: `child_generate_args` gives them the options that load
the same model the same way.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Callable, Sequence

import torch

from d3cli import kernels
from d3cli.base.errors import UserError
from d3cli.core.decode.results import load_fields
from d3cli.core.decode.schedule import DecaySchedule
from d3cli.core.model.loader import ModelOptions, gguf_file, load
from d3cli.core.model.model_facts import context_length, model_device, model_dtype, num_decoder_layers
from d3cli.core.session.front_door import open_model
from d3cli.core.session.plan import plan_for
from d3cli.core.session.settings import DecodeSettings
from d3cli.core.text.prompts import encode_prompt
from d3cli.evaluation.speed import side_by_side, startup, steps
from d3cli.evaluation.timing import decode_seconds

SPEED_PROMPT = "Explain in a few paragraphs why the sky is blue and why sunsets are red."
BATCH_SIZES = (1, 4, 16)
BATCH_PROMPTS = (
    SPEED_PROMPT,
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List the planets of the solar system and one fact about each.",
    "How does a refrigerator keep food cold? Explain it to a child.",
)
LONG_REPLY_TOKENS = 1024
LONG_PROMPT_TOKENS = 2000  # the prefill and long-context rows (--quick: QUICK_LONG_PROMPT_TOKENS)
QUICK_LONG_PROMPT_TOKENS = 512


QUICK_TOKENS = 32  # --quick: replies this long, at most 3 rounds, and only the side-by-side sections
QUICK_REPEATS = 3


def measure(loaded, model_options: ModelOptions, settings: DecodeSettings, alphas: Sequence[float], repeats: int,
            on_status: Callable[[str], None] = lambda message: None, quick: bool = False) -> dict:
    """The speed report of `loaded` (loaded with `model_options`): each weight kind at full depth and with D3
    beside the memory-bandwidth limit and llama.cpp, α = 1 against the model's own generate, the step cost per
    layer (with transformers' own layers too), D3 against its ideal at each α (bridged and plain when the
    calibration has bridges), batches, the KV cache of a long reply, and the first token in new processes.
    `quick`: short replies, few rounds, only the weight kinds, α = 1 and the step costs at the first α."""

    num_layers = num_decoder_layers(loaded.model)
    decode_seconds(loaded.model, encode_prompt(loaded.tokenizer, SPEED_PROMPT), DecaySchedule.full(num_layers), 2)
    loading = load_fields(loaded)  # after a reply read every weight (mapped tiles count once touched), before
    # other weight kinds load beside it
    alphas = alphas or (plan_for(loaded, settings).schedule.alpha,)  # none asked: the model's own schedule
    if quick:
        repeats = min(repeats, QUICK_REPEATS)
        settings = dataclasses.replace(settings, max_new_tokens=min(settings.max_new_tokens, QUICK_TOKENS))
        alphas = alphas[:1]
    schedules = [plan_for(loaded, dataclasses.replace(settings, alpha=alpha)).schedule for alpha in alphas]
    if schedules[0].bridge_maps is not None:  # bridged D3 beside plain D3 at each α
        schedules = [variant for schedule in schedules for variant in (schedule, schedule.with_bridge_maps(None))]
    tokens = settings.max_new_tokens
    prompt = encode_prompt(loaded.tokenizer, SPEED_PROMPT)
    batch_prompts = [encode_prompt(loaded.tokenizer, text) for text in BATCH_PROMPTS]
    context = context_length(loaded.model)
    long_tokens = LONG_REPLY_TOKENS if context is None else max(2, min(LONG_REPLY_TOKENS, context - len(prompt) - 1))
    report = {
        "task": "speed",
        "model": loaded.name,
        "quick": quick,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": str(model_device(loaded.model)),
                    "dtype": str(model_dtype(loaded.model)).replace("torch.", "")},
        "weights": loaded.weights.as_dict() if loaded.weights is not None else None,
        "num_layers": num_layers,
        "calibration": loaded.calibration.label if loaded.calibration is not None else None,
        "skip_order": schedules[0].skip_order,
        "prompt_tokens": len(prompt),
        "tokens": tokens,
        "repeats": repeats,
        "load_s": loading["load_s"],
        "peak_memory_bytes": loading["peak_memory_bytes"],
    }
    on_status("measuring the memory bandwidth")
    bandwidth = side_by_side.memory_bandwidth()
    report["bandwidth_gb_s"] = bandwidth / 1e9
    on_status("timing each weight kind (and llama.cpp) side by side")
    report.update(weight_kinds(loaded, model_options, settings, prompt, tokens, repeats, bandwidth,
                               gguf_file(model_options.model)))
    long_tokens_in = QUICK_LONG_PROMPT_TOKENS if quick else LONG_PROMPT_TOKENS
    if context is not None:
        long_tokens_in = max(16, min(long_tokens_in, context - tokens - 1))
    on_status(f"timing a {long_tokens_in}-token prompt's prefill and the decode after it (and llama.cpp's)")
    report["long_prompt"] = side_by_side.long_prompt(loaded, long_prompt_ids(loaded.tokenizer, long_tokens_in),
                                                      tokens, repeats, gguf_path_or_none(model_options))
    on_status("timing model.generate against d3 at α = 1")
    report.update(steps.alpha1_against_hf(loaded.model, loaded.tokenizer, prompt, tokens, repeats))
    on_status("timing decode steps at each depth")
    report.update(steps.step_times(loaded.model, prompt, schedules[0], tokens, repeats))
    on_status("timing D3 against full depth at each α")
    report["alphas"] = steps.alpha_rows(loaded.model, prompt, schedules, tokens, repeats,
                                        report["t_fixed_ms"], report["t_layer_ms"], report.get("t_bridge_ms", 0.0))
    if quick:
        return report
    if model_options.fused:
        on_status("timing decode steps with transformers' own decoder layers")

        unfused = load(dataclasses.replace(model_options, fused=False))
        before = steps.step_times(unfused.model, prompt, schedules[0].with_bridge_maps(None), tokens, repeats)
        report["transformers_layers"] = {key: before[key] for key in ("t_fixed_ms", "t_layer_ms", "r2", "step_ms")}
        del unfused
    on_status("timing batches")
    report["batches"] = steps.batch_rows(loaded.model, batch_prompts, schedules[0], BATCH_SIZES,
                                         min(tokens, 64), max(1, repeats // 2))
    on_status("measuring the KV cache of a long reply")
    report["kv_cache"] = steps.kv_cache_bytes(loaded.model, prompt, schedules[0], long_tokens)
    on_status("timing the first token in new processes")
    report["first_token"] = startup.first_token_seconds(child_generate_args(model_options, settings),
                                                        max(1, min(repeats, 3)))
    return report


def long_prompt_ids(tokenizer, count: int) -> list[int]:
    """`count` token ids of plain text: the batch prompts' texts, repeated as needed (no chat template)."""
    text = " ".join(BATCH_PROMPTS)
    ids: list[int] = []
    while len(ids) < count:
        ids += list(tokenizer(text, add_special_tokens=not ids)["input_ids"])
    return ids[:count]


def gguf_path_or_none(model_options: ModelOptions) -> str | None:
    path = gguf_file(model_options.model)
    return None if path is None else str(path)


def other_weight_kinds(loaded) -> list[str]:
    """The kinds to time beside the loaded one: on the CPU every kind (the loaded one's dense dtype aside), on a
    GPU none (its quantized kernels are CPU kernels)."""
    if model_device(loaded.model).type != "cpu" or loaded.weights is None:
        return []
    return [kind for kind in ("float32", "int8", "int4") if kind != loaded.weights.kind]


def weight_kinds(loaded, model_options: ModelOptions, settings: DecodeSettings, prompt: Sequence[int], tokens: int,
                 repeats: int, bandwidth: float, gguf_path) -> dict:
    """Each weight kind (the loaded model's and `other_weight_kinds`) at full depth and with the schedule of
    `settings`, and llama.cpp on the GGUF file, in turns: the rows of side_by_side.compare."""

    models, skipped = [(loaded, None)], {}
    for kind in other_weight_kinds(loaded):  # each beside the ones loaded already, where it still fits
        try:
            models.append((open_model(dataclasses.replace(model_options, weights=kind, dtype="auto"),
                                      settings).loaded, None))
        except UserError as error:  # memory.refuse_if_too_big: a big model's float32 copy, say
            skipped[kind] = str(error)
    if loaded.weights is not None and (loaded.weights.kernels or "").startswith("d3"):
        name = f"{loaded.weights.kind} on torch's kernels"
        try:
            with kernels.turned_off():  # the same weights on torch's kernels: what d3 ran before its own
                on_torch = open_model(dataclasses.replace(model_options, dtype="auto"), settings).loaded
            models.append((on_torch, name))
        except UserError as error:
            skipped[name] = str(error)
    sides = []
    for model, name in models:
        num_layers = num_decoder_layers(model.model)
        schedule = plan_for(model, settings).schedule
        sides += side_by_side.d3_sides(model, {"full depth": DecaySchedule.full(num_layers),
                                                f"α {schedule.alpha:g}": schedule}, prompt, tokens, name)
    llama, why = side_by_side.llama_cpp_side(None if gguf_path is None else str(gguf_path),
                                              torch.get_num_threads(), len(prompt) + tokens + 16)
    if llama is not None:
        sides.append(side_by_side.Side("llama.cpp", "llama.cpp", lambda count: llama.decode_seconds(prompt, count),
                                        side_by_side.gguf_step_bytes(str(gguf_path))))
    rows = side_by_side.with_llama_ratios(side_by_side.compare(sides, tokens, repeats, bandwidth))
    return {"weight_kinds": rows, "skipped_weight_kinds": skipped,
            "llama_cpp": {"version": llama.version} if llama is not None else {"skipped": why}}


def child_generate_args(model_options: ModelOptions, settings: DecodeSettings) -> list[str]:
    """The options a new `d3 generate` process needs to load the model this run loaded, the same way: the model
    options, and the calibration or layer profile this run was given."""
    args = model_options.cli_args()
    if settings.calibration is not None:
        args += ["--calibration", settings.calibration]
    if settings.profile is not None:
        args += ["--profile", settings.profile]
    if not settings.bridges:
        args.append("--no-bridges")
    return args
