"""Bridges: a fitted linear stand-in for a run of skipped layers.

Where a step skips the consecutive layers first..last, plain skipping hands the run's input h (the output of layer
first - 1) on unchanged. A bridge hands on `h + h·W` instead, W fitted in closed form on full-depth hidden states:
ridge-regularised least squares from the inputs of layer `first` to the change the run makes to them (the output
of layer `last` minus its input). No training, one solve per run; skipped layers still write no KV entries and are
never read again, so the cache stays exact. A low-rank bridge stores W as `down·up` (d×r and r×d).

`skipping.py` applies a bridge at the run's last stand-in (its input is the run's input, since the stand-ins before
it pass theirs through); `BridgeFitter` accumulates the sums a fit needs, one batch of hidden states at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from d3cli.core.decode.schedule import runs_at_depths

DEFAULT_RIDGE = 0.1  # λ = DEFAULT_RIDGE · mean(diag(XᵀX)); docs/BRIDGES.md has the scan that chose it


@dataclass(frozen=True)
class Bridge:
    """h -> h + h·W for the skipped run first..last; W is `weight`, or `down @ up` when low-rank."""

    first: int
    last: int
    weight: torch.Tensor | None = None  # [d, d]
    down: torch.Tensor | None = None  # [d, r]
    up: torch.Tensor | None = None  # [r, d]

    @property
    def rank(self) -> int | None:
        return None if self.weight is not None else int(self.down.shape[1])

    def delta(self, hidden: torch.Tensor) -> torch.Tensor:
        """h·W for hidden states of shape [..., d]."""
        if self.weight is not None:
            return hidden @ self.weight
        return (hidden @ self.down) @ self.up

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.delta(hidden)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The bridge's tensors under the names a calibration file stores them by."""
        prefix = f"bridge.{self.first}.{self.last}"
        if self.weight is not None:
            return {f"{prefix}.weight": self.weight}
        return {f"{prefix}.down": self.down, f"{prefix}.up": self.up}

    def to(self, device, dtype) -> Bridge:
        move = lambda tensor: None if tensor is None else tensor.to(device=device, dtype=dtype)  # noqa: E731
        return Bridge(self.first, self.last, move(self.weight), move(self.down), move(self.up))

    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in (self.weight, self.down, self.up)
                   if tensor is not None)

    def flops_per_token(self) -> int:
        """Multiply-adds of one `delta` per token."""
        if self.weight is not None:
            return int(self.weight.numel())
        return int(self.down.numel() + self.up.numel())


class Bridges(Mapping):
    """The bridges of one model by (first, last) run, on the model's device and dtype. A schedule carries them."""

    def __init__(self, bridges: Iterable[Bridge] = (), source: str = ""):
        self._by_run = {(bridge.first, bridge.last): bridge for bridge in bridges}
        self.source = source  # where they came from, for summaries

    def __getitem__(self, run: tuple[int, int]) -> Bridge:
        return self._by_run[run]

    def __iter__(self):
        return iter(self._by_run)

    def __contains__(self, run) -> bool:
        return run in self._by_run

    def __len__(self) -> int:
        return len(self._by_run)

    def __repr__(self) -> str:
        return f"Bridges({len(self)} runs from {self.source or 'memory'})"

    def missing(self, runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """The runs among `runs` that have no bridge (they are skipped plainly)."""
        return [run for run in runs if run not in self._by_run]

    def to(self, device, dtype) -> Bridges:
        """Every bridge on `device` in `dtype` now."""
        return Bridges((bridge.to(device, dtype) for bridge in self._by_run.values()), self.source)

    def on(self, device, dtype) -> OnDevice:
        """A view that moves each bridge to `device` in `dtype` when a step first needs it, so only the runs a
        schedule reaches take device memory."""
        return OnDevice(self, device, dtype)

    def nbytes(self, runs: Iterable[tuple[int, int]] | None = None) -> int:
        chosen = self._by_run if runs is None else {run: self._by_run[run] for run in runs if run in self._by_run}
        return sum(bridge.nbytes() for bridge in chosen.values())


class OnDevice(Bridges):
    """The bridges of `source`, each moved to the device on first use and kept there."""

    def __init__(self, source: Bridges, device, dtype):
        super().__init__((), source.source)
        self._source, self.device, self.dtype = source, device, dtype
        self._by_run = dict.fromkeys(source)  # the runs; a bridge is None until moved

    def __getitem__(self, run: tuple[int, int]) -> Bridge:
        bridge = self._by_run[run]
        if bridge is None:
            bridge = self._by_run[run] = self._source[run].to(self.device, self.dtype)
        return bridge

    def nbytes(self, runs: Iterable[tuple[int, int]] | None = None) -> int:
        """Bytes on the device now (of `runs`, or of every bridge moved so far)."""
        chosen = self._by_run if runs is None else {run: self._by_run.get(run) for run in runs}
        return sum(bridge.nbytes() for bridge in chosen.values() if bridge is not None)


def bridges_used(schedule, steps: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The runs the first `steps` steps of `schedule` skip: (bridged, unbridged), each in order of first use."""
    seen = runs_at_depths(schedule.num_layers, schedule.drop_order, schedule.depths(steps))
    bridges = schedule.bridge_maps or {}
    return [run for run in seen if run in bridges], [run for run in seen if run not in bridges]


class BridgeFitter:
    """Accumulates, over batches of full-depth hidden states, the sums that fit the bridge of each run:
    XᵀX for every run's first layer and XᵀΔ for every run, X the inputs of layer `first`, Δ the change the run
    makes to them. Float64 sums, so many batches add up without losing precision."""

    def __init__(self, runs: Sequence[tuple[int, int]], hidden_size: int, device="cpu"):
        self.runs = list(runs)
        self.hidden_size = hidden_size
        self.tokens = 0
        options = dict(dtype=torch.float64, device=device)
        self.gram = {first: torch.zeros(hidden_size, hidden_size, **options) for first in {f for f, _ in self.runs}}
        self.cross = {run: torch.zeros(hidden_size, hidden_size, **options) for run in self.runs}

    def add(self, states: Mapping[int, torch.Tensor]) -> None:
        """`states[j]`: [tokens, d] inputs of layer j (j = L means the last layer's output), for every layer a run
        starts at or ends before."""
        inputs = {}
        for first in self.gram:
            inputs[first] = states[first].to(self.gram[first].device, torch.float64)
            self.gram[first] += inputs[first].T @ inputs[first]
        for first, last in self.runs:
            change = states[last + 1].to(inputs[first].device, torch.float64) - inputs[first]
            self.cross[(first, last)] += inputs[first].T @ change
        self.tokens += next(iter(inputs.values())).shape[0] if inputs else 0

    def solve(self, ridge: float = DEFAULT_RIDGE, rank: int | None = None) -> list[Bridge]:
        """One bridge per run: W = (XᵀX + λI)⁻¹ XᵀΔ with λ = ridge · mean(diag(XᵀX)), cut to `rank` by SVD."""
        bridges = []
        for first, last in self.runs:
            gram = self.gram[first]
            penalty = ridge * float(gram.diagonal().mean()) + 1e-12
            eye = torch.eye(self.hidden_size, dtype=gram.dtype, device=gram.device)
            weight = torch.linalg.solve(gram + penalty * eye, self.cross[(first, last)])
            bridges.append(low_rank(first, last, weight, rank))
        return bridges


def low_rank(first: int, last: int, weight: torch.Tensor, rank: int | None) -> Bridge:
    """The bridge with `weight`, or its best rank-`rank` approximation (SVD) when `rank` is below the full rank."""
    if rank is None or rank >= min(weight.shape):
        return Bridge(first, last, weight=weight.float().contiguous())
    left, values, right = torch.linalg.svd(weight, full_matrices=False)
    down = (left[:, :rank] * values[:rank]).float().contiguous()
    return Bridge(first, last, down=down, up=right[:rank].float().contiguous())
