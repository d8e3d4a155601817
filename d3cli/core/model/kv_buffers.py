"""Keys and values that grow without copying, and the cache of d3's own model: no import of transformers.

`GrowingBuffers` is one attention layer's keys and values, held as views of the first positions of larger buffers
that grow by half when full, so a decode step copies only its own positions and the total copying of a reply is
linear (transformers' `DynamicLayer` concatenates: every step copies every cached position, about 3 ms a step at
1024 positions for the embedded model on two CPU cores). A kernel that writes new positions itself asks for room
(`reserve`) and then makes them part of the cache (`advance`).

Two caches hold such layers:

    kv_cache.DepthDecayCache   transformers' `DynamicCache` with `GrowingLayer`s, for a transformers model
    OwnCache                   a list of `GrowingBuffers`, for d3's own model (d3_model.py), whose layers are all
                               full attention: the same buffers and the same answers without importing transformers

engine.new_cache(model) makes the one a model takes. Both tolerate layers that stop being run (D3): a skipped layer stops
growing, so lengths are answered from the layer that wrote last, which ran every step so far.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class ReservingCache:
    """A cache whose full-attention layers lend a kernel their buffers (`reserve`, then `advance`)."""

    def reserve(self, layer_idx: int, shape: tuple[int, int, int, int], dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        raise NotImplementedError

    def advance(self, layer_idx: int, held: int, tokens: int) -> None:
        raise NotImplementedError


class GrowingBuffers:
    """One full-attention layer's keys and values in buffers with spare capacity (see the module docstring).
    `keys` and `values` are views of the buffers' first positions; anything that replaces them itself (batch
    selection, reordering, offloading) is adopted into fresh buffers at the next update; a crop stays a view of the
    same buffer and is overwritten by the next positions."""

    GROWTH = 1.5
    MIN_CAPACITY = 64

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if not hasattr(self, "keys"):  # standing alone (OwnCache); DynamicLayer sets these itself
            self.keys = self.values = None
            self.is_initialized = False
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None  # the keys/values this layer made last

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = torch.tensor([], dtype=key_states.dtype, device=self.device)
        self.values = torch.tensor([], dtype=value_states.dtype, device=self.device)
        self.is_initialized = True

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.keys.numel() == 0:
            return 0
        return self.keys.shape[-2]

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` positions (a negative count, as transformers' layers take it)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of positions to remove, not {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.keys = self.keys[..., : -abs(tokens_to_remove), :]
        self.values = self.values[..., : -abs(tokens_to_remove), :]

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
        parent = getattr(super(), "reset", None)  # transformers' layer (GrowingLayer) resets its own state
        if parent is not None:
            parent()
        else:
            self.keys = self.values = None
            self.is_initialized = False


class OwnCache(ReservingCache):
    """The KV cache of d3's own model (d3_model.py): one `GrowingBuffers` per decoder layer, every layer full
    attention; lengths come from the layer that wrote last, never from a skipped one."""

    def __init__(self, num_layers: int):
        self.layers = [GrowingBuffers() for _ in range(num_layers)]
        self._last_writer: int | None = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys_values = self.layers[layer_idx].update(key_states, value_states)
        self._last_writer = layer_idx
        return keys_values

    def reserve(self, layer_idx: int, shape: tuple[int, int, int, int], dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.layers[layer_idx].reserve(shape, dtype, device)

    def advance(self, layer_idx: int, held: int, tokens: int) -> None:
        self.layers[layer_idx].advance(held, tokens)
        self._last_writer = layer_idx

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[self._last_writer if self._last_writer is not None else layer_idx].get_seq_length()

    def held_by_every_layer(self) -> int:
        """How many leading positions every layer holds: after a reply, the part computed at full depth."""
        return min((layer.get_seq_length() for layer in self.layers), default=0)

    def crop_to(self, length: int) -> bool:
        """Keep the first `length` positions in every layer (always possible: no layer slides)."""
        for layer in self.layers:
            held = layer.get_seq_length()
            if held > length:
                layer.crop(length - held)
        self._last_writer = None
        return True

    def compact(self, layer_indices: Iterable[int]) -> None:
        """Give back the spare capacity of layers that will not run again in this reply."""
        for index in layer_indices:
            if index < len(self.layers):
                self.layers[index].compact()

    def kv_bytes(self) -> int:
        """Bytes of the cached keys and values of every layer (the positions held, not spare capacity)."""
        return sum(tensor_bytes(layer.keys, layer.values) for layer in self.layers)

    def capacity_bytes(self) -> int:
        """Bytes allocated for keys and values, spare capacity included: what the cache costs in memory."""
        return sum(layer.capacity_bytes() for layer in self.layers)


def tensor_bytes(*tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if isinstance(tensor, torch.Tensor))
