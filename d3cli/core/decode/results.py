"""Replies gathered from token events, and the JSON record every command prints for one reply. No torch here."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

from d3cli.core.decode.schedule import DecaySchedule, runs_at_depths


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one row, as every renderer sees it (the engine yields them; a d3 server's stream
    carries them to `d3 generate --server`)."""

    row: int
    index: int  # i: the token's position in the reply
    token_id: int
    text: str  # the text this token makes printable (may be empty, or carry held-back text)
    layers: int  # k_i: decoder layers that ran to produce this token
    elapsed_s: float  # seconds since the prefill started
    finish_reason: str | None = None  # "eos", "stop", "length" on the row's last token


@dataclass
class Reply:
    """One row's reply as it was generated."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    layers_per_token: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    time_s: float = 0.0  # from the start of the prefill to this row's last token
    first_token_s: float | None = None  # time to first token (prefill included)

    def add(self, event) -> None:
        self.token_ids.append(event.token_id)
        self.text += event.text
        self.layers_per_token.append(event.layers)
        self.time_s = event.elapsed_s
        if self.first_token_s is None:
            self.first_token_s = event.elapsed_s
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_layers(self) -> float:
        return sum(self.layers_per_token) / len(self.layers_per_token) if self.layers_per_token else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens over the whole time, prefill included (what a user waits for per token)."""
        return self.generated_tokens / self.time_s if self.time_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first over the time after it: the decode steps alone (None before a second token)."""
        decode_s = self.time_s - (self.first_token_s or 0.0)
        return (self.generated_tokens - 1) / decode_s if self.generated_tokens > 1 and decode_s > 0 else None

    def prefill_tokens_per_s(self, prompt_tokens: int) -> float | None:
        """Prompt tokens over the time to the first token (the prefill, which produces it)."""
        return prompt_tokens / self.first_token_s if self.first_token_s else None


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during `generate`: carries the replies as far as they got (finish_reason "interrupted")."""

    def __init__(self, replies: list[Reply]):
        super().__init__()
        self.replies = replies


class ReplyCollector:
    """Feeds each `TokenEvent` to the reply of its row."""

    def __init__(self, rows: int):
        self.replies = [Reply() for _ in range(rows)]

    def add(self, event) -> None:
        self.replies[event.row].add(event)

    def mark_interrupted(self) -> None:
        for reply in self.replies:
            if reply.finish_reason is None:
                reply.finish_reason = "interrupted"


def layer_ratio(reply: Reply, num_layers: int) -> float:
    """Mean layers per token over L: the fraction of the decoder's layer compute that ran."""
    return _layer_ratio(reply.mean_layers, num_layers)


def estimated_speedup(reply: Reply, num_layers: int) -> float:
    """L over mean layers: the speedup if the layers were all the work (an upper bound; --compare measures)."""
    return _estimated_speedup(reply.mean_layers, num_layers)


def _layer_ratio(mean_layers: float, num_layers: int) -> float:
    return mean_layers / num_layers if num_layers else 0.0


def _estimated_speedup(mean_layers: float, num_layers: int) -> float:
    return num_layers / mean_layers if mean_layers else 0.0


def session_totals(records: list[dict], num_layers: int) -> dict | None:
    """Totals over reply records (chat's /stats): token-weighted mean layers, layer ratio and estimated speedup as
    for one reply, tokens per second over the replies' own time; None before the first reply."""
    if not records:
        return None
    tokens = sum(record["generated_tokens"] for record in records)
    layer_sum = sum(sum(record["layers_per_token"]) for record in records)
    seconds = sum(record["time_s"] for record in records)
    mean_layers = layer_sum / tokens if tokens else 0.0
    return {
        "turns": len(records),
        "generated_tokens": tokens,
        "mean_layers": mean_layers,
        "num_layers": num_layers,
        "layer_ratio": _layer_ratio(mean_layers, num_layers),
        "time_s": seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "estimated_speedup": _estimated_speedup(mean_layers, num_layers),
    }


def calibration_fields(schedule: DecaySchedule, layers_per_token, calibration=None) -> dict[str, object]:
    """What a reply's JSON says about the model's calibration: which file (None: the model has none, "bundled":
    the one d3 ships) and the kind of weights it was made on, whether bridges stood in for skipped runs, and which
    runs they were."""
    bridges = schedule.bridge_maps or {}
    runs = runs_at_depths(schedule.num_layers, schedule.drop_order, dict.fromkeys(layers_per_token))
    fields = {
        "calibration": getattr(calibration, "label", None),
        "calibration_weights": getattr(calibration, "weights", None),
        "bridges": schedule.bridge_maps is not None,
        "bridged_runs": [list(run) for run in runs if run in bridges],
    }
    if schedule.bridge_maps is not None:
        fields["unbridged_runs"] = [list(run) for run in runs if run not in bridges]
    return fields


def weights_fields(weights) -> dict[str, object]:
    """Which weights ran, as a reply's JSON says it: the kind (`int4`, `float32`, ...) and the whole phrase."""
    if weights is None:
        return {}
    return {"weights": weights.kind, "weights_detail": weights.label()}


def schedule_fields(plan) -> dict[str, object]:
    """The schedule's settings as every reply's JSON reports them, and where they came from (a plan.DecodePlan's
    `schedule_source`: option, calibration or default)."""
    schedule = plan.schedule
    return {"alpha": schedule.alpha, "min_layers": schedule.min_layers, "warmup": schedule.warmup,
            "head": schedule.head, "tail": schedule.tail, "skip_order": schedule.skip_order,
            "schedule_source": plan.schedule_source, "schedule_warning": plan.past_calibration}


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def load_fields(loaded) -> dict[str, object]:
    """How long the model took to load and the process's peak memory so far (a loader.LoadedModel)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {"load_s": _rounded(getattr(loaded, "load_s", None), 2), "peak_memory_bytes": peak}


def reply_record(
    reply: Reply, plan, model_name: str, prompt_tokens: int, baseline: Reply | None = None, weights=None,
    loaded=None, cached_tokens: int = 0,
) -> dict[str, object]:
    """The JSON object of `generate --json` / `--jsonl` for one reply decoded with `plan` (a plan.DecodePlan, whose
    calibration it names); `weights` what ran (weight_choice.WeightsReport) or None; `loaded` the
    loader.LoadedModel (its load time and the peak memory are reported) or None; `cached_tokens` of the prompt's
    tokens came from a kept cache (a chat's earlier turns, a server's prompt cache) and were not prefilled."""
    schedule = plan.schedule
    record: dict[str, object] = {
        "model": model_name,
        **weights_fields(weights),
        **schedule_fields(plan),
        **calibration_fields(schedule, reply.layers_per_token, plan.calibration),
        "num_layers": schedule.num_layers,
        "prompt_tokens": prompt_tokens,
        "cached_prompt_tokens": cached_tokens,
        "generated_tokens": reply.generated_tokens,
        "text": reply.text,
        "token_ids": reply.token_ids,
        "layers_per_token": reply.layers_per_token,
        "mean_layers": round(reply.mean_layers, 4),
        "layer_ratio": round(layer_ratio(reply, schedule.num_layers), 4),
        "estimated_speedup": round(estimated_speedup(reply, schedule.num_layers), 4),
        "time_s": round(reply.time_s, 4),
        "time_to_first_token_s": round(reply.first_token_s or 0.0, 4),
        "tokens_per_s": round(reply.tokens_per_s, 3),
        "prefill_tokens_per_s": _rounded(reply.prefill_tokens_per_s(prompt_tokens - cached_tokens)),
        "decode_tokens_per_s": _rounded(reply.decode_tokens_per_s),
        "finish_reason": reply.finish_reason,
        **(load_fields(loaded) if loaded is not None else {}),
    }
    if baseline is not None:
        record["baseline"] = {
            "text": baseline.text,
            "token_ids": baseline.token_ids,
            "generated_tokens": baseline.generated_tokens,
            "time_s": round(baseline.time_s, 4),
            "tokens_per_s": round(baseline.tokens_per_s, 3),
            "finish_reason": baseline.finish_reason,
        }
        record["measured_speedup"] = round(measured_speedup(reply, baseline), 4)
        record["identical"] = reply.token_ids == baseline.token_ids
    return record


def measured_speedup(reply: Reply, baseline: Reply) -> float:
    """Wall-clock tokens/s of D3 over tokens/s at full depth (per token, so replies of different length compare)."""
    return reply.tokens_per_s / baseline.tokens_per_s if baseline.tokens_per_s else 0.0
