"""The KV cache of a D3 reply: the model's own `DynamicCache`, made to tolerate layers that stop being run.

`DepthDecayCache` is the model's own `DynamicCache` with two changes. A skipped layer stops growing, so its length is
stale, and the attention mask must never be sized from it. Transformers sizes masks from the first layer of each kind
(full attention, sliding window); this cache answers those questions from the layer of that kind that wrote last,
which is always one that ran every step so far. And its full-attention layers (`GrowingLayer`) append into spare
capacity instead of concatenating, so a decode step no longer copies every cached position of every layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from d3cli.core.model.kv_buffers import GrowingBuffers, ReservingCache, tensor_bytes


class GrowingLayer(GrowingBuffers, DynamicLayer):
    """transformers' full-attention cache layer with kv_buffers.GrowingBuffers' buffers: new positions written into
    spare capacity instead of concatenated."""


class DepthDecayCache(DynamicCache, ReservingCache):
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

    def reserve(self, layer_idx: int, shape: tuple[int, int, int, int], dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """`GrowingLayer.reserve` for layer `layer_idx`, None when that layer is not a growing full-attention one."""
        while len(self.layers) <= layer_idx and self.layer_class_to_replicate is GrowingLayer:
            self.layers.append(GrowingLayer())
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        return layer.reserve(shape, dtype, device) if isinstance(layer, GrowingLayer) else None

    def advance(self, layer_idx: int, held: int, tokens: int) -> None:
        """`GrowingLayer.advance` for layer `layer_idx`, which is now the last layer of its kind to have written."""
        self.layers[layer_idx].advance(held, tokens)
        self._last_writer[False] = layer_idx

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

