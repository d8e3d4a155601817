"""Where decoding time goes, and how close D3 comes to the layer-skipping limit.

The limit on a machine is ideal(k̄) = T_step(L) / (T_fixed + k̄·T_layer): a step that runs k layers costs
T_fixed (embedding, final norm, LM head, sampling, Python) plus k·T_layer. With bridges each bridged run adds
T_bridge (one d×d matmul, or two thin ones when low-rank), so the bridged limit is T_step(L) / (T_fixed + k̄·T_layer
+ r̄·T_bridge), r̄ the mean bridged runs per decode step. Every timing comes after an untimed
warm-up, with the device synchronised before each clock read. Compared sides take turns (α = 1 and the model's own
`generate` decode in lockstep) and each step's time is its median over the rounds, so a machine whose speed drifts
moves both sides alike; decode times exclude the prefill.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterator, Sequence

import torch

from d3cli.core.decode.engine import generate_steps, make_prompt_batch, new_cache, stream_generate, synchronize
from d3cli.core.decode.schedule import DecaySchedule, StaticSchedule
from d3cli.core.model.model_facts import model_device, num_decoder_layers
from d3cli.evaluation.timing import decode_seconds, fit_line, measured_decode_speedup, median_total

NO_EOS = frozenset({-1})  # both sides produce exactly the tokens asked for


class _Lockstep:
    """A `generate` streamer that, each time the model's own loop hands it a token, advances d3's event stream by
    one token: the two decode side by side, so both sides of every step see the same machine. It notes how long
    each side took for each token (the first token's time includes the prefill); the model's time excludes d3's."""

    def __init__(self, d3_events: Iterator):
        self.d3_events = d3_events
        self.hf_seconds: list[float] = []
        self.d3_seconds: list[float] = []
        self.d3_token_ids: list[int] = []
        self.since: float | None = None

    def put(self, value) -> None:
        now = time.perf_counter()
        if self.since is not None:  # the first call carries the prompt, before the model's prefill
            self.hf_seconds.append(now - self.since)
            event = next(self.d3_events)
            self.d3_seconds.append(time.perf_counter() - now)
            self.d3_token_ids.append(event.token_id)
        self.since = time.perf_counter()

    def end(self) -> None:
        pass


def alpha1_against_hf(model, tokenizer, prompt_ids: Sequence[int], tokens: int, repeats: int) -> dict:
    """Tokens/s of the model's own greedy `generate` and of d3's engine at α = 1 (events, detokenizing and all),
    same prompt, same number of tokens, decoded in lockstep (one token of each in turn); each token's time is its
    median over `repeats` rounds after an untimed one, so neither a drift in machine speed nor a stall in one
    round favours either side."""
    input_ids = torch.tensor([list(prompt_ids)], device=model_device(model))
    full = DecaySchedule.full(num_decoder_layers(model))
    # No end-of-sequence token on either side: `min_new_tokens` would mask EOS in the model's scores, which d3 (told
    # only not to stop) does not, and the two would part at the first step where EOS is the likeliest token.
    endless = copy.deepcopy(model.generation_config)
    endless.eos_token_id, endless.pad_token_id = [], None

    def run() -> tuple[_Lockstep, list[int]]:
        d3_events = stream_generate(model, tokenizer, [list(prompt_ids)], full, max_new_tokens=tokens, eos_ids=NO_EOS)
        lockstep = _Lockstep(d3_events)
        try:
            with torch.inference_mode():
                output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                        generation_config=endless, max_new_tokens=tokens, do_sample=False,
                                        streamer=lockstep)
        finally:
            d3_events.close()  # gives the model its layers back
        return lockstep, output[0, input_ids.shape[1]:].tolist()

    run()  # warm-up
    hf_rounds, d3_rounds = [], []
    same = True
    for _ in range(repeats):
        lockstep, hf_tokens = run()
        hf_rounds.append(lockstep.hf_seconds)
        d3_rounds.append(lockstep.d3_seconds)
        same = same and hf_tokens == lockstep.d3_token_ids
    hf_rate = tokens / median_total(hf_rounds)
    d3_rate = tokens / median_total(d3_rounds)
    return {"hf_tokens_per_s": hf_rate, "d3_alpha1_tokens_per_s": d3_rate, "alpha1_ratio": d3_rate / hf_rate,
            "same_tokens": same}


def step_times(model, prompt_ids: Sequence[int], base: DecaySchedule, tokens: int, repeats: int) -> dict:
    """Median decode-step time at depths from the core layers to L, and the line T_fixed + k·T_layer through them.
    When `base` carries bridges, each depth is timed with them too (in turns with the plain step), and T_bridge is
    the median extra time per bridged run."""
    floor, num_layers = base.head + base.tail, base.num_layers
    depths = sorted({floor, num_layers, *range(floor, num_layers + 1, max(1, (num_layers - floor) // 8))})
    plain = base.with_bridge_maps(None)
    variants = {"plain": [StaticSchedule.like(plain, depth) for depth in depths]}
    if base.bridge_maps is not None:
        variants["bridged"] = [StaticSchedule.like(base, depth) for depth in depths]
    decode_seconds(model, prompt_ids, variants["plain"][-1], min(tokens, 8))  # warm-up
    seconds = {name: [[] for _ in depths] for name in variants}
    for _ in range(repeats):
        for index in range(len(depths)):
            for name, schedules in variants.items():
                seconds[name][index].extend(decode_seconds(model, prompt_ids, schedules[index], tokens))
    plain_ms = [statistics.median(values) * 1e3 for values in seconds["plain"]]
    t_fixed, t_layer, r2 = fit_line(list(zip(depths, plain_ms)))
    report = {"t_fixed_ms": max(t_fixed, 0.0), "t_layer_ms": max(t_layer, 1e-9), "r2": r2,
              "step_ms": [{"layers": depth, "ms": ms} for depth, ms in zip(depths, plain_ms)]}
    if "bridged" in variants:
        rows, per_run = [], []
        for depth, schedule, values, plain_step in zip(depths, variants["bridged"], seconds["bridged"], plain_ms):
            runs = bridged_runs_at(schedule, 1)
            ms = statistics.median(values) * 1e3
            rows.append({"layers": depth, "ms": ms, "bridged_runs": runs})
            if runs:
                per_run.append((ms - plain_step) / runs)
        report["bridged_step_ms"] = rows
        report["t_bridge_ms"] = statistics.median(per_run) if per_run else 0.0
    return report


def bridged_runs_at(schedule: DecaySchedule, step: int) -> int:
    """How many of the runs step `step` skips have a bridge."""
    bridges = schedule.bridge_maps or {}
    return sum(1 for run in schedule.runs_at(step) if run in bridges)


def mean_decode_layers(schedule: DecaySchedule, tokens: int) -> float:
    """k̄: the mean layers of the decode steps 1..N−1 (step 0 is the prefill's token)."""
    steps = range(1, max(tokens, 2))
    return sum(schedule.layers_at(step) for step in steps) / len(steps)


def mean_bridged_runs(schedule: DecaySchedule, tokens: int) -> float:
    """r̄: the mean bridged runs of the decode steps 1..N−1."""
    steps = range(1, max(tokens, 2))
    return sum(bridged_runs_at(schedule, step) for step in steps) / len(steps)


def alpha_rows(model, prompt_ids: Sequence[int], schedules: Sequence[DecaySchedule], tokens: int, repeats: int,
               t_fixed_ms: float, t_layer_ms: float, t_bridge_ms: float = 0.0) -> list[dict]:
    """Per schedule: k̄ (and r̄, its mean bridged runs), ideal(k̄) from the fitted costs (bridges included), the
    measured decode speedup over full depth, and their ratio. Full depth and each schedule alternate so drifts in
    machine speed hit both alike."""
    rows = []
    for schedule in schedules:
        k_bar = mean_decode_layers(schedule, tokens)
        r_bar = mean_bridged_runs(schedule, tokens)
        ideal = (t_fixed_ms + schedule.num_layers * t_layer_ms) / (t_fixed_ms + k_bar * t_layer_ms
                                                                   + r_bar * t_bridge_ms)
        measured = measured_decode_speedup(model, [prompt_ids], schedule, tokens, repeats)
        rows.append({"alpha": schedule.alpha, "min_layers": schedule.min_layers,
                     "bridges": schedule.bridge_maps is not None, "mean_layers": k_bar, "mean_bridged_runs": r_bar, "ideal_speedup": ideal,
                     "measured_speedup": measured, "efficiency": measured / ideal})
    return rows


def batch_rows(model, prompts: Sequence[Sequence[int]], schedule: DecaySchedule, batch_sizes: Sequence[int],
               tokens: int, repeats: int) -> list[dict]:
    """Generated tokens per second (all rows) at each batch size, at full depth and with `schedule`."""
    full = DecaySchedule.full(schedule.num_layers)
    device = model_device(model)

    def seconds(batch_size: int, chosen: DecaySchedule) -> float:
        rows = [prompts[index % len(prompts)] for index in range(batch_size)]
        batch = make_prompt_batch(rows, pad_token_id=0, device=device)
        synchronize(model)
        started = time.perf_counter()
        for _ in generate_steps(model, batch, chosen, max_new_tokens=tokens):
            pass
        synchronize(model)
        return time.perf_counter() - started

    results = []
    for batch_size in batch_sizes:
        seconds(batch_size, full)  # warm-up at this shape
        full_times, d3_times = [], []
        for _ in range(repeats):
            full_times.append(seconds(batch_size, full))
            d3_times.append(seconds(batch_size, schedule))
        full_rate = batch_size * tokens / statistics.median(full_times)
        d3_rate = batch_size * tokens / statistics.median(d3_times)
        results.append({"batch_size": batch_size, "full_tokens_per_s": full_rate, "d3_tokens_per_s": d3_rate,
                        "speedup": d3_rate / full_rate})
    return results


def kv_cache_bytes(model, prompt_ids: Sequence[int], schedule: DecaySchedule, tokens: int) -> dict:
    """Bytes of cached keys and values after a `tokens`-token reply, at full depth and with `schedule` (a skipped
    layer stores nothing for the tokens that skip it), and the bytes allocated for them, spare capacity included."""
    batch = make_prompt_batch([list(prompt_ids)], pad_token_id=0, device=model_device(model))
    report = {"tokens": tokens, "prompt_tokens": len(prompt_ids)}
    for name, chosen in (("full", DecaySchedule.full(schedule.num_layers)), ("d3", schedule)):
        cache = new_cache(model)
        for _ in generate_steps(model, batch, chosen, max_new_tokens=tokens, cache=cache):
            pass
        report[f"{name}_bytes"] = cache.kv_bytes()
        report[f"{name}_allocated_bytes"] = cache.capacity_bytes()
    report["ratio"] = report["d3_bytes"] / report["full_bytes"] if report["full_bytes"] else float("nan")
    return report
