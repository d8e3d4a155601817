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
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None  # the keys/values this layer made last

    def _held(self) -> int:
        return self.keys.shape[-2] if self.keys is not None and self.keys.dim() == 4 else 0

    def _writes_in_place(self, shape: torch.Size, dtype: torch.dtype, device: torch.device, held: int) -> bool:
        """True when `keys`/`values` are still the heads of our buffers and `shape[2]` new positions of that shape
        ([batch, heads, positions, head_dim]) fit behind them."""
        buffers = (self._key_buffer, self._value_buffer)
        if buffers[0] is None or held == 0:
            return False
        if buffers[0].is_inference() and not torch.is_inference_mode_enabled():
            return False  # an in-place write to an inference tensor is refused outside inference mode
        for view, buffer in zip((self.keys, self.values), buffers):
            if (view.data_ptr() != buffer.data_ptr() or view.stride() != buffer.stride()
                    or buffer.shape[:2] != shape[:2] or buffer.shape[3] != shape[3]
                    or buffer.dtype != dtype or buffer.device != device):
                return False
        return held + shape[2] <= buffers[0].shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self._held()
        needed = held + key_states.shape[-2]
        if not self._writes_in_place(key_states.shape, key_states.dtype, key_states.device, held):
            self._reallocate(key_states.shape, key_states.dtype, key_states.device, held, needed)
        self._key_buffer[:, :, held:needed].copy_(key_states)
        self._value_buffer[:, :, held:needed].copy_(value_states)
        self.advance(held, key_states.shape[-2])
        return self.keys, self.values

    def reserve(self, shape: tuple[int, int, int, int], dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for `shape[2]` new positions ([batch, heads, positions, head_dim]) behind the held ones, for a
        kernel that writes them itself: the key and value buffers (the held positions first) and how many are
        held. `advance` then makes the new positions part of the cache."""
        views, buffer = self._views, self._key_buffer
        if views is not None and views[0] is self.keys and views[1] is self.values:  # a decode step's fast path
            held = views[0].shape[2]
            if (held + shape[2] <= buffer.shape[2] and buffer.shape[0] == shape[0] and buffer.shape[1] == shape[1]
                    and buffer.shape[3] == shape[3] and buffer.dtype == dtype and buffer.device == device
                    and (not buffer.is_inference() or torch.is_inference_mode_enabled())):
                return buffer, self._value_buffer, held
        if not self.is_initialized:
            self.lazy_initialization(torch.empty(0, dtype=dtype, device=device), torch.empty(0, dtype=dtype,
                                                                                               device=device))
        held = self._held()
        shape = torch.Size(shape)
        if not self._writes_in_place(shape, dtype, device, held):
            self._reallocate(shape, dtype, device, held, held + shape[2])
        return self._key_buffer, self._value_buffer, held

    def advance(self, held: int, tokens: int) -> None:
        """The `tokens` positions written behind the `held` ones (after `reserve`) are now cached."""
        self.keys = self._key_buffer.narrow(2, 0, held + tokens)
        self.values = self._value_buffer.narrow(2, 0, held + tokens)
        self._views = (self.keys, self.values)

    def _reallocate(self, shape: torch.Size, dtype: torch.dtype, device: torch.device, held: int,
                    needed: int) -> None:
        capacity = max(int(needed * self.GROWTH), self.MIN_CAPACITY)
        buffers = []
        for old in (self.keys, self.values):
            buffer = torch.empty((shape[0], shape[1], capacity, shape[3]), dtype=dtype, device=device)
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
        self._key_buffer = self._value_buffer = self._views = None
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


def tensor_bytes(*tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if isinstance(tensor, torch.Tensor))
