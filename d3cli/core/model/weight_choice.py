"""Which weights a model runs with: the `--weights` kinds, what `auto` picks, and putting a kind into a model.

    float32, bfloat16, float16   dense weights in that dtype (what transformers loads)
    int8                         every linear layer int8 per output channel (quantized.Int8Linear)
    int4                         every linear layer 4-bit in groups (quantized.Int4Linear), the LM head int8
    auto                         on the CPU: a GGUF file in its own precision, each tensor as the file stores it
                                 where d3's kernels run its type (Q4_0/Q4_1/Q4_K as int4, Q5_0/Q5_1/Q5_K as int5,
                                 Q6_K as int6, Q8_0 as int8: quantized.StoredLinear and the tiles of gguf_tiles.py),
                                 other types as the nearest of int4/int8; a float model in float32, or the first of
                                 int8/int4 that fits the memory (memory.py). On a GPU: dense bfloat16.

Quantized kinds run on the CPU on d3's own kernels (d3cli/kernels) with float32 activations, which the kernels
quantize to int8 per block of 32 as llama.cpp does; where those kernels cannot be built, on torch's int4/int8 kernels
with bfloat16 activations (their fast path). The choices are measured in docs/PERFORMANCE.md.

This module holds the choice (`resolve_weights` -> WeightChoice) and the report of what ran (WeightsReport);
weights.py puts a choice into a model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from d3cli import kernels
from d3cli.base.errors import UserError
from d3cli.core.model.gguf_blocks import nearest_kind
from d3cli.core.model.quantized import (
    GROUP_SIZE,
    INT4_GROUP_SIZES,
)

DENSE_KINDS = ("float32", "bfloat16", "float16")


QUANTIZED_KINDS = ("int8", "int4")


STORED_KINDS = ("int5", "int6")  # a GGUF file's 5- and 6-bit types as stored: on d3's kernels, with auto only


KERNEL_KINDS = {"int4": (4, 14), "int5": (5, 15), "int6": (16,), "int8": (8,)}  # their tiles (kernels/blocks.h)


FILE_KIND = "file"  # auto on a GGUF file: each tensor as the nearest kind of its own type


@dataclass(frozen=True)
class WeightChoice:
    """A resolved `--weights`: the kind, the activations' dtype, and the int4 group size for float weights."""

    kind: str  # a dense kind, int8, int4, or FILE_KIND
    dtype: torch.dtype
    group_size: int = GROUP_SIZE
    why: str = ""  # how auto chose, for --help-like messages and the speed report

    @property
    def quantized(self) -> bool:
        return self.kind not in DENSE_KINDS


def resolve_weights(requested: str, dtype_requested: str, device: torch.device, *, gguf_types: Mapping[str, str]
                    | None, device_map: str | None, group_size: int = GROUP_SIZE,
                    default_dtype: Callable[[str, torch.device], torch.dtype]) -> WeightChoice:
    """`--weights` and `--dtype` as one choice. `gguf_types`: the GGUF type of each tensor when the model is a GGUF
    file (None otherwise); `default_dtype(dtype, device)`: the loader's dtype resolution for dense weights."""
    if group_size not in INT4_GROUP_SIZES:
        raise UserError(f"--group-size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, not {group_size}")
    if requested in DENSE_KINDS:
        if dtype_requested not in ("auto", requested):
            raise UserError(f"--weights {requested} runs dense {requested} weights, --dtype {dtype_requested} asks "
                            f"for {dtype_requested}: give one of them")
        return WeightChoice(requested, getattr(torch, requested), why="asked for")
    if requested == "auto":
        quantized_file = bool(gguf_types) and any(kind != "float" for kind in map(_nearest, gguf_types.values()))
        if device.type != "cpu" or device_map is not None or dtype_requested != "auto" or not quantized_file:
            dtype = default_dtype(dtype_requested, device)
            why = ("a GGUF file runs in its own precision only on the CPU" if quantized_file and device.type != "cpu"
                   else "--device-map spreads dense weights" if quantized_file and device_map is not None
                   else f"--dtype {dtype_requested} was asked for" if quantized_file and dtype_requested != "auto"
                   else "float weights stay dense")
            return WeightChoice(str(dtype).replace("torch.", ""), dtype, why=why)
        return WeightChoice(FILE_KIND, quantized_dtype(), why="the GGUF file's own precision")
    # int8 / int4
    if device_map is not None:
        raise UserError(f"--weights {requested} cannot be spread with --device-map (quantized weights run on one "
                        "CPU): drop --device-map, or use --weights bfloat16")
    if device.type != "cpu":
        raise UserError(f"--weights {requested} runs torch's CPU kernels, not on {device.type}: use --device cpu, "
                        "or --weights bfloat16 on the GPU")
    if dtype_requested == "float16":
        raise UserError(f"--weights {requested} runs with bfloat16 or float32 activations, not float16 (the CPU "
                        "kernels are 10x slower in float16): use --dtype bfloat16")
    dtype = quantized_dtype() if dtype_requested == "auto" else getattr(torch, dtype_requested)
    return WeightChoice(requested, dtype, group_size, why="asked for")


def quantized_dtype() -> torch.dtype:
    """The activations' dtype for quantized weights: float32 on d3's kernels (which quantize activations per block
    themselves), bfloat16 on torch's (fast only with bfloat16 activations); choices.DTYPE_HELP says so to users."""
    return torch.float32 if kernels.available() else torch.bfloat16


def _nearest(gguf_type: str) -> str:
    return nearest_kind(gguf_type)


@dataclass(frozen=True)
class WeightsReport:
    """What ran: the kind asked for as resolved, the activations' dtype, the modules per stored kind, and bytes."""

    kind: str  # what the report calls the weights: "int4", "int8", "float32", ...
    dtype: str  # the activations' dtype
    modules: dict = field(default_factory=dict)  # stored kind -> linear layers (and embedding tables)
    sources: dict = field(default_factory=dict)  # how they were made -> count: "gguf Q4_1", "quantized on load"
    group_size: int | None = None
    layer_bytes: tuple[int, ...] = ()  # weight bytes of each decoder layer
    head_bytes: int = 0  # the LM head's weight bytes
    other_bytes: int = 0  # everything else (embeddings, final norm)
    why: str = ""
    head_kind: str | None = None  # the LM head's stored kind
    kernels: str | None = None  # which kernels quantized weights run on: "d3 kernels (avx2)", "torch kernels (...)"

    @property
    def step_bytes(self) -> int:
        """Weight bytes one full-depth decode step streams: every decoder layer and the LM head."""
        return sum(self.layer_bytes) + self.head_bytes

    def step_bytes_at(self, layers: float) -> float:
        """Weight bytes of a step that runs `layers` decoder layers (the mean layer's bytes each)."""
        mean_layer = sum(self.layer_bytes) / len(self.layer_bytes) if self.layer_bytes else 0.0
        return self.head_bytes + layers * mean_layer

    def label(self) -> str:
        """One phrase for summaries: "int4 (group 32), LM head int8, bfloat16 activations"."""
        if self.kind not in QUANTIZED_KINDS + STORED_KINDS:
            return self.kind
        layers = Counter({kind: count for kind, count in self.modules.items() if not kind.endswith(" embedding")})
        if self.head_kind:
            layers[self.head_kind] -= 1
        details = [f"group {self.group_size}"] if self.kind == "int4" and self.group_size else []
        details += [f"{count} {kind}" for kind, count in sorted(layers.items()) if kind != self.kind and count > 0]
        text = self.kind + (f" ({'; '.join(details)})" if details else "")
        if self.head_kind and self.head_kind != self.kind:
            text += f", LM head {self.head_kind}"
        kernels = f", {self.kernels.split(' (')[0] if self.kernels.startswith('torch') else self.kernels}" \
            if self.kernels else ""
        return f"{text}, {self.dtype} activations{kernels}"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "dtype": self.dtype, "label": self.label(), "kernels": self.kernels,
                "modules": dict(self.modules),
                "sources": dict(self.sources), "group_size": self.group_size, "head": self.head_kind,
                "step_bytes": self.step_bytes, "why": self.why}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
