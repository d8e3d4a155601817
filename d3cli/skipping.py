"""Where layers are skipped: the decoder's layer list during a reply, and a cache that tolerates stale layers.

`LayerSkipper.keep(kept_layers)` is the one place that decides which decoder layers run: every layer not in
`kept_layers` is swapped for a stand-in in the model's own layer list, so the model's own forward (masks, rotary
embeddings, sliding-window layer types, final norm, soft-capping) runs unchanged around it. The swap is undone on exit.
A stand-in passes its input through, except the last stand-in of a skipped run that has a bridge (bridges.py): it
applies the bridge to its input, which is the run's input because the stand-ins before it passed theirs through.

Teacher-forced scoring (scoring.py) needs a per-position version of the same skip: `skipped_at_positions` replaces a
layer's output by its input at the positions whose step skips it, in one forward over a whole continuation, and at
the last layer of each skipped run by the run's bridge applied to the run's input. Because the kept sets are nested
this computes what cached decoding with `LayerSkipper` computes (tests/test_scoring.py).

`DepthDecayCache` is the model's own `DynamicCache` with two changes. A skipped layer stops growing, so its length is
stale, and the attention mask must never be sized from it. Transformers sizes masks from the first layer of each kind
(full attention, sliding window); this cache answers those questions from the layer of that kind that wrote last,
which is always one that ran every step so far. And its full-attention layers (`GrowingLayer`) append into spare
capacity instead of concatenating, so a decode step no longer copies every cached position of every layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from d3cli.errors import UserError
from d3cli.schedule import skipped_runs


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


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (`model.model.layers` for Llama, Qwen2, Gemma, Phi-3, Mistral...)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config(decoder=True) if config is not None else None
    num_layers = getattr(text_config, "num_hidden_layers", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and (num_layers is None or len(layers) == num_layers):
        return layers
    candidates = [
        module
        for _, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and num_layers is not None and len(module) == num_layers
    ]
    if len(candidates) == 1:
        return candidates[0]
    raise UserError(
        f"cannot find the decoder layers of {type(model).__name__}: d3 supports decoder-only models whose layers "
        "form one list (Llama, Mistral, Qwen2/2.5/3, Gemma 2/3, Phi-3 and their relatives)"
    )


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


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer that writes new positions into spare capacity.

    Transformers' `DynamicLayer` concatenates: every decode step copies all cached keys and values of the layer into
    a fresh tensor, a cost that grows with the reply (about 3 ms a step at 1024 positions for the embedded model on
    two CPU cores). Here `keys` and `values` are views of the first positions of larger buffers that grow by half
    when full, so a step copies only its own positions and the total copying of a reply is linear. Anything that
    replaces `keys`/`values` itself (batch selection, reordering, offloading) is adopted into fresh buffers at the
    next update; a crop stays a view of the same buffer and is overwritten by the next positions.
    """

    GROWTH = 1.5
    MIN_CAPACITY = 64

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _held(self) -> int:
        return self.keys.shape[-2] if self.keys is not None and self.keys.dim() == 4 else 0

    def _writes_in_place(self, key_states: torch.Tensor, value_states: torch.Tensor, held: int) -> bool:
        """True when `keys`/`values` are still the heads of our buffers and the new positions fit behind them."""
        buffers = (self._key_buffer, self._value_buffer)
        if buffers[0] is None or held == 0:
            return False
        if buffers[0].is_inference() and not torch.is_inference_mode_enabled():
            return False  # an in-place write to an inference tensor is refused outside inference mode
        for view, buffer, new in zip((self.keys, self.values), buffers, (key_states, value_states)):
            if (view.data_ptr() != buffer.data_ptr() or view.stride() != buffer.stride()
                    or buffer.shape[:2] != new.shape[:2] or buffer.shape[3] != new.shape[3]
                    or buffer.dtype != new.dtype or buffer.device != new.device):
                return False
        return held + key_states.shape[-2] <= buffers[0].shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self._held()
        needed = held + key_states.shape[-2]
        if not self._writes_in_place(key_states, value_states, held):
            self._reallocate(key_states, value_states, held, needed)
        self._key_buffer[:, :, held:needed].copy_(key_states)
        self._value_buffer[:, :, held:needed].copy_(value_states)
        self.keys = self._key_buffer[:, :, :needed]
        self.values = self._value_buffer[:, :, :needed]
        return self.keys, self.values

    def _reallocate(self, key_states: torch.Tensor, value_states: torch.Tensor, held: int, needed: int) -> None:
        capacity = max(int(needed * self.GROWTH), self.MIN_CAPACITY)
        buffers = []
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            buffer = new.new_empty((new.shape[0], new.shape[1], capacity, new.shape[3]))
            if held:
                buffer[:, :, :held].copy_(old)
            buffers.append(buffer)
        self._key_buffer, self._value_buffer = buffers

    def compact(self) -> None:
        """Give back the spare capacity: for a layer that will not run again in this reply."""
        if self._key_buffer is not None and self._held() < self._key_buffer.shape[-2]:
            self.keys, self.values = self.keys.clone(), self.values.clone()
            self._key_buffer, self._value_buffer = self.keys, self.values

    def capacity_bytes(self) -> int:
        if self._key_buffer is None or self._held() == 0 or self.keys.data_ptr() != self._key_buffer.data_ptr():
            return tensor_bytes(self.keys, self.values)
        return tensor_bytes(self._key_buffer, self._value_buffer)

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


class DepthDecayCache(DynamicCache):
    """A `DynamicCache` whose mask sizes come from a layer that ran every step, never from a skipped one, and whose
    full-attention layers grow without copying (`GrowingLayer`)."""

    def __init__(self, config=None, **kwargs):
        super().__init__(config=config, **kwargs)
        self.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        if getattr(self, "layer_class_to_replicate", None) is DynamicLayer:
            self.layer_class_to_replicate = GrowingLayer
        self._last_writer: dict[bool, int] = {}

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys_values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._last_writer[self._is_sliding(layer_idx)] = layer_idx
        return keys_values

    def _is_sliding(self, layer_idx: int) -> bool:
        return bool(getattr(self.layers[layer_idx], "is_sliding", False))

    def _fresh_layer(self, layer_idx: int) -> int:
        """The layer of the same kind as `layer_idx` that was written last, hence holds every position so far."""
        if layer_idx >= len(self.layers):
            return layer_idx
        return self._last_writer.get(self._is_sliding(layer_idx), layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._fresh_layer(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._fresh_layer(layer_idx))

    def held_by_every_layer(self) -> int:
        """How many leading positions every layer holds: after a reply, the part computed at full depth."""
        return min((layer.get_seq_length() for layer in self.layers), default=0)

    def crop_to(self, length: int) -> bool:
        """Keep the first `length` positions in every layer. False when a sliding-window layer has already
        forgotten positions it would need (the caller then starts a fresh cache)."""
        for layer in self.layers:
            held = layer.get_seq_length()
            if held <= length:
                continue
            if getattr(layer, "is_sliding", False) and held >= getattr(layer, "sliding_window", held + 1):
                return False
        for layer in self.layers:
            held = layer.get_seq_length()
            if held > length:
                layer.crop(length - held)
        self._last_writer.clear()
        return True

    def compact(self, layer_indices: Iterable[int]) -> None:
        """Give back the spare capacity of layers that will not run again in this reply."""
        for index in layer_indices:
            if index < len(self.layers) and isinstance(self.layers[index], GrowingLayer):
                self.layers[index].compact()

    def kv_bytes(self) -> int:
        """Bytes of the cached keys and values of every layer (the positions held, not spare capacity)."""
        return sum(tensor_bytes(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in self.layers)

    def capacity_bytes(self) -> int:
        """Bytes allocated for keys and values, spare capacity included: what the cache costs in memory."""
        return sum(layer.capacity_bytes() if isinstance(layer, GrowingLayer)
                   else tensor_bytes(getattr(layer, "keys", None), getattr(layer, "values", None))
                   for layer in self.layers)


def tensor_bytes(*tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if isinstance(tensor, torch.Tensor))


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
