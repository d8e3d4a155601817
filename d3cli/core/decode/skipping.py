"""Where layers are skipped: the decoder's layer list during a reply, and per position in a teacher-forced forward.

`LayerSkipper.keep(kept_layers)` is the one place that decides which decoder layers run: every layer not in
`kept_layers` is swapped for a stand-in in the model's own layer list, so the model's own forward (masks, rotary
embeddings, sliding-window layer types, final norm, soft-capping) runs unchanged around it. The swap is undone on exit.
A stand-in passes its input through, except the last stand-in of a skipped run that has a bridge (bridges.py): it
applies the bridge to its input, which is the run's input because the stand-ins before it passed theirs through.

Teacher-forced scoring (scoring.py) needs a per-position version of the same skip: `skipped_at_positions` replaces a
layer's output by its input at the positions whose step skips it, in one forward over a whole continuation, and at
the last layer of each skipped run by the run's bridge applied to the run's input. Because the kept sets are nested
this computes what cached decoding with `LayerSkipper` computes (tests/evaluation/test_scoring.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from d3cli.core.decode.schedule import skipped_runs
from d3cli.core.model.model_facts import find_decoder_layers


class SkippedLayer(nn.Module):
    """Stands in for a decoder layer that does not run: its output is its input, or, when it is the last layer of a
    skipped run with a bridge, the bridge applied to its input (the run's input)."""

    def __init__(self, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.bridge = None  # bridges.Bridge of the run this stand-in closes, set by LayerSkipper.keep

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.bridge is None:
            return hidden_states
        return self.bridge.apply(hidden_states)

    def extra_repr(self) -> str:
        closes = "" if self.bridge is None else f", bridges={self.bridge.first}..{self.bridge.last}"
        return f"layer_index={self.layer_index}{closes}"


class LayerSkipper:
    """Runs only the kept decoder layers while active; restores the model's own layers on exit."""

    def __init__(self, model: nn.Module, bridges=None):
        self.layers = find_decoder_layers(model)
        if any(isinstance(layer, SkippedLayer) for layer in self.layers):
            raise RuntimeError("the model still has skipped layers from an unfinished decode: close its generator")
        self.original_layers = list(self.layers)
        self.stand_ins = [SkippedLayer(index) for index in range(len(self.original_layers))]
        self.kept: frozenset[int] = frozenset(range(len(self.original_layers)))
        self.bridges = bridges or {}  # (first, last) -> bridges.Bridge

    @property
    def num_layers(self) -> int:
        return len(self.original_layers)

    def keep(self, kept_layers: Iterable[int]) -> None:
        """Make exactly `kept_layers` run in the next forward passes. Only changed entries are touched."""
        kept = frozenset(kept_layers)
        if kept == self.kept:
            return
        for index in kept.symmetric_difference(self.kept):
            self.layers[index] = self.original_layers[index] if index in kept else self.stand_ins[index]
        self.kept = kept
        for stand_in in self.stand_ins:
            stand_in.bridge = None
        for first, last in skipped_runs(kept, self.num_layers):
            self.stand_ins[last].bridge = self.bridges.get((first, last))

    def restore(self) -> None:
        self.keep(range(self.num_layers))

    def __enter__(self) -> LayerSkipper:
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()


class _Replay(nn.Module):
    """Stands in for layer 0 while a forward starts later: hands on hidden states computed before."""

    def __init__(self, hidden_states: torch.Tensor):
        super().__init__()
        self.hidden_states = hidden_states

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.hidden_states


class starting_at:  # noqa: N801 - a context manager, named for how it reads: `with starting_at(model, 12, h):`
    """While active, a forward runs only layers `first`..L-1, layer `first` receiving `hidden_states` (its input as
    an earlier forward of the same tokens computed it): the layers before it are stand-ins that write no cache.
    Exact for anything that changes only layers from `first` on; it saves their share of the work."""

    def __init__(self, model: nn.Module, first: int, hidden_states: torch.Tensor):
        self.layers = find_decoder_layers(model)
        self.first, self.hidden_states = first, hidden_states
        self.saved: list[nn.Module] = []

    def __enter__(self) -> starting_at:
        if self.first == 0:
            return self
        self.saved = [self.layers[index] for index in range(self.first)]
        self.layers[0] = _Replay(self.hidden_states)
        for index in range(1, self.first):
            self.layers[index] = SkippedLayer(index)
        return self

    def __exit__(self, *exc_info) -> None:
        for index, layer in enumerate(self.saved):
            self.layers[index] = layer
        self.saved = []


def skipped_at_positions(model: nn.Module, skipped: torch.Tensor, observe=None, bridges=None) -> _PositionHooks:
    """Score many decoding steps in one forward: while active, layer j's output is replaced by its input at every
    position p with `skipped[j, p]` True, so a teacher-forced forward sees exactly what cached D3 decoding computes
    (the nesting means no later kept position ever reads what a skipped one wrote). Where layer j is the last of a
    skipped run first..j at position p and `bridges` has that run, the output there is the bridge applied to the
    input instead (the run's input, since the run's earlier layers passed theirs through). `observe(layer, input,
    output)`, if given, sees each layer's hidden states before the replacement."""
    return _PositionHooks(find_decoder_layers(model), skipped, observe, bridges)


def bridge_positions(skipped: torch.Tensor, bridges) -> dict[int, list[tuple[object, torch.Tensor]]]:
    """For a skip plan [layers, positions]: per layer j, the (bridge, positions) pairs of the runs first..j that
    end at j, for the runs that `bridges` has."""
    found: dict[int, list[tuple[object, torch.Tensor]]] = {}
    if not bridges or skipped is None:
        return found
    plan = skipped.cpu()
    num_layers = plan.shape[0]
    start = torch.full((plan.shape[1],), -1, dtype=torch.long)
    for layer in range(num_layers):
        start = torch.where(plan[layer], torch.where(start >= 0, start, torch.full_like(start, layer)),
                            torch.full_like(start, -1))
        following = plan[layer + 1] if layer + 1 < num_layers else torch.zeros_like(plan[layer])
        ends_here = plan[layer] & ~following
        for first in start[ends_here].unique().tolist():
            bridge = bridges.get((int(first), layer))
            if bridge is not None:
                positions = (ends_here & (start == first)).nonzero()[:, 0]
                found.setdefault(layer, []).append((bridge, positions.to(skipped.device)))
    return found


class _PositionHooks:
    def __init__(self, layers: nn.ModuleList, skipped: torch.Tensor | None, observe, bridges=None):
        self.layers, self.skipped, self.observe, self.handles = layers, skipped, observe, []
        self.bridged = bridge_positions(skipped, bridges)

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            hidden_out = output[0] if isinstance(output, tuple) else output
            hidden_in = args[0] if args else kwargs["hidden_states"]
            if self.observe is not None:
                self.observe(index, hidden_in, hidden_out)
            if self.skipped is None or not bool(self.skipped[index].any()):
                return output
            replaced = torch.where(self.skipped[index][None, :, None], hidden_in, hidden_out)
            for bridge, positions in self.bridged.get(index, ()):
                replaced[:, positions] = bridge.apply(hidden_in[:, positions])
            return (replaced, *output[1:]) if isinstance(output, tuple) else replaced
        return hook

    def __enter__(self) -> _PositionHooks:
        if self.skipped is not None and self.skipped.shape[0] != len(self.layers):
            raise ValueError(f"skip mask is for {self.skipped.shape[0]} layers, the model has {len(self.layers)}")
        self.handles = [layer.register_forward_hook(self._hook(index), with_kwargs=True)
                        for index, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
