"""Whether a model fits the machine's memory: the estimate of what a kind of weights takes, `auto`'s choice for a
float checkpoint on the CPU, and the one line that refuses a model before any of it is loaded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from d3cli.base.errors import UserError
from d3cli.core.model.gguf_blocks import FLOAT_TYPES, nearest_kind
from d3cli.core.model.gguf_tiles import PACKED_TYPES
from d3cli.core.model.weight_choice import FILE_KIND

FITS_IN = 0.8  # of the free memory: what `auto` leaves for the runtime, the KV cache and the system
BYTES_PER_VALUE = {"int8": 1 + 4 / 32, "int4": 0.5 + 4 / 32}  # with a float16 scale (and offset) per 32 at most
FILE_OVERHEAD = 1.03  # tiles padded to whole tiles, embedding rows read, the odd dense tensor


def available_memory() -> int | None:
    """Bytes of memory the system can give a new allocation now (MemAvailable), or None where it does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _element_bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def gguf_needs(header, choice) -> int:
    """About the bytes a GGUF file's model takes loaded with `choice`: in its own blocks (the types d3's kernels run
    as stored take the file's bytes; others their nearest kind's), re-quantized to int8/int4, or every weight
    dequantized to a dense dtype."""
    if not choice.quantized:
        return sum(tensor.rows * tensor.columns for tensor in header.tensors) * _element_bytes(choice.dtype)
    total = 0.0
    for tensor in header.tensors:
        values = tensor.rows * tensor.columns
        if choice.kind == FILE_KIND and tensor.type_name in PACKED_TYPES:
            total += tensor.nbytes
        elif tensor.type_name in FLOAT_TYPES or len(tensor.shape) != 2:
            total += values * _element_bytes(choice.dtype) if choice.kind == FILE_KIND else tensor.nbytes
        else:
            total += values * BYTES_PER_VALUE[choice.kind if choice.kind in BYTES_PER_VALUE else nearest(tensor)]
    return int(FILE_OVERHEAD * total)


def nearest(tensor) -> str:
    kind = nearest_kind(tensor.type_name)
    return kind if kind in BYTES_PER_VALUE else "int8"


def folder_needs(values: int, choice) -> int:
    """About the bytes a float checkpoint of `values` values takes loaded with `choice`."""
    return int(values * (BYTES_PER_VALUE.get(choice.kind) or _element_bytes(choice.dtype)))


def fitting_kind(choice, values: int, choose_kind):
    """`auto` for a float checkpoint on the CPU: `choice` (dense float32, exact) where it fits in FITS_IN of the
    free memory, else int8 per channel (d3's kernels, near-lossless), else int4 (`choose_kind(kind)` resolves
    each); the reason goes into the weights report."""
    free = available_memory()
    if free is None or folder_needs(values, choice) <= FITS_IN * free:
        return choice
    for kind in ("int8", "int4"):
        fallback = choose_kind(kind)
        if folder_needs(values, fallback) <= FITS_IN * free or kind == "int4":  # int4 or the refusal
            return dataclasses.replace(fallback, why=(
                f"float32 would take {folder_needs(values, choice) / 2**30:.1f} GiB of the {free / 2**30:.1f} GiB "
                f"free; {kind} runs on d3's kernels"))
    return choice


def refuse_if_too_big(needed: int, what: str, choice) -> None:
    """One line before loading when the model cannot fit in the memory the system has free (a GPU's model too: it is
    built in the CPU's memory, then moved)."""
    free = available_memory()
    if free is not None and needed > free:
        kind = "in its own blocks" if choice.kind == FILE_KIND else f"as {choice.kind}"
        smaller = ", or --weights int4" if choice.kind not in ("int4", FILE_KIND) else ""
        raise UserError(f"{what} needs about {needed / 2**30:.1f} GiB {kind}, and this machine has "
                        f"{free / 2**30:.1f} GiB free: use a smaller model{smaller}, or free memory")
