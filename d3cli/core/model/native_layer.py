"""d3's kernels inside a model: a decoder layer in one call.

`NativeLayer` is a fused layer (fused_layers.py) whose projections all run on d3's kernels (d3cli/kernels), computed
by one call of torch.ops.d3.decoder_layer: the same layer, every token row by the same operations whether it comes
in a prefill, a decode step or a forward over a whole sequence. The cache stays the model's: d3's own caches
(kv_buffers.ReservingCache: kv_cache.DepthDecayCache, or OwnCache for d3's own model) lend the kernel their buffers
to write the new keys and values into; any other cache (model.generate's) has them stored with its own `update`.
native_step.py runs a whole decode step of such layers.
"""

from __future__ import annotations

import torch

from d3cli.core.model.kv_buffers import ReservingCache
from d3cli.core.model.quantized import TiledWeights

CACHE_DTYPE = torch.float16  # the kernel's keys and values (kernels/attention.h): llama.cpp's default too


class NativeLayer:
    """A fused layer (fused_layers.FusedDecoderLayer) computed by one call of torch.ops.d3.decoder_layer."""

    def __init__(self, layer, tensors: list, layout: list[int], numbers: list[float]):
        self.layer, self.tensors, self.layout, self.numbers = layer, tensors, layout, numbers
        self._weights = self._build()  # checked by the kernel now, not at the first call

    @property
    def weights(self):
        """The layer's weights as the kernel holds them (torch.classes.d3.LayerWeights)."""
        if self._weights is None:  # a copy of the model: made anew at its first call
            self._weights = self._build()
        return self._weights

    def _build(self):
        layer = self.layer
        q_norm, k_norm = (None if norm is None else norm.weight for norm in (layer.q_norm, layer.k_norm))
        return torch.classes.d3.LayerWeights(self.tensors, self.layout, self.numbers, layer.input_layernorm.weight,
                                             layer.post_attention_layernorm.weight, q_norm, k_norm)

    def __getstate__(self):  # a copy of the model makes its kernel object anew (it holds no state of its own)
        return {**self.__dict__, "_weights": None}

    def kv_shape(self, batch: int, tokens: int) -> tuple[int, int, int, int]:
        return batch, self.layer.num_key_value_heads, tokens, self.layer.head_dim

    def forward(self, hidden: torch.Tensor, attention_mask, position_embeddings, cache) -> torch.Tensor | None:
        """The layer's output, or None when this call is not one the kernel takes (then the Python path runs)."""
        layer = self.layer
        if hidden.dtype != torch.float32 or position_embeddings is None:
            return None
        batch, tokens, _ = hidden.shape
        shape = (batch, layer.num_key_value_heads, tokens, layer.head_dim)
        reserved = cache.reserve(layer.layer_idx, shape, CACHE_DTYPE, hidden.device) if isinstance(
            cache, ReservingCache) else None
        if reserved is not None:  # d3's own cache: the kernel writes into its buffers
            key_buffer, value_buffer, past = reserved
        else:  # another cache (model.generate's) or none: the past copied into new buffers
            held = _past_states(cache, layer.layer_idx, batch, layer.num_key_value_heads, layer.head_dim)
            if held is None:
                return None
            past = held[0].shape[2]
            key_buffer, value_buffer = (torch.cat([states.to(CACHE_DTYPE), states.new_empty(shape, dtype=CACHE_DTYPE)],
                                                  dim=2) for states in held)
        mask = _bool_mask(attention_mask, past + tokens)
        if mask is False:
            return None
        cos, sin = position_embeddings
        out = torch.ops.d3.decoder_layer(hidden.contiguous(), key_buffer, value_buffer, past, mask, cos.contiguous(),
                                         sin.contiguous(), self.weights)
        if reserved is not None:
            cache.advance(layer.layer_idx, past, tokens)
        elif cache is not None:  # in the cache's own dtype (float32 holds float16 values exactly)
            cache.update(key_buffer[:, :, past:].to(hidden.dtype), value_buffer[:, :, past:].to(hidden.dtype),
                         layer.layer_idx)
        return out


def native_layer(layer) -> NativeLayer | None:
    """`layer` (a FusedDecoderLayer) as one kernel call, when every projection runs on d3's kernels (d3cli/kernels), its norms are float32
    and its attention is full (not a sliding window); None otherwise."""
    projections = [list(layer.qkv), [layer.o_proj], list(layer.gate_up), [layer.down_proj]]
    tiled = [[getattr(module, "tiled", None) for module in modules] for modules in projections]
    if any(not isinstance(part, TiledWeights) for parts in tiled for part in parts):
        return None
    norms = [layer.input_layernorm, layer.post_attention_layernorm, layer.q_norm, layer.k_norm]
    if any(norm is not None and norm.weight.dtype != torch.float32 for norm in norms):
        return None
    if _sliding(layer):
        return None
    if layer.head_dim % 2 or layer.head_dim > 1024 or layer.config._attn_implementation not in ("sdpa", "eager"):
        return None
    tensors, meta = [], []
    for part in (part for parts in tiled for part in parts):
        part_tensors, part_meta = part.part()
        tensors += part_tensors
        meta += part_meta
    layout = [layer.num_heads, layer.num_key_value_heads, layer.head_dim, layer.intermediate_size,
              *(len(parts) for parts in tiled), *meta]
    epsilons = [layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon,
                layer.q_norm.variance_epsilon if layer.q_norm is not None else 0.0]
    return NativeLayer(layer, tensors, layout, [*epsilons, float(layer.scaling)])


def _sliding(layer) -> bool:
    """Whether the layer attends within a sliding window: its config's layer types say so, or, without them,
    a config sliding window applies to every layer (Mistral)."""
    config = layer.config
    layer_types = getattr(config, "layer_types", None)
    if layer.sliding_window is not None or layer.attention_type == "sliding_attention":
        return True
    if layer_types:
        return layer_types[layer.layer_idx] != "full_attention"
    return getattr(config, "sliding_window", None) is not None


def _past_states(cache, layer_idx: int, batch: int, kv_heads: int, head_dim: int):
    """The keys and values a cache other than d3's holds for layer `layer_idx` ([batch, kv_heads, positions,
    head_dim]), empty ones when it holds none (or there is no cache), None when they are not a full-attention
    layer's plain float32 (or float16) tensors."""
    from transformers.cache_utils import DynamicLayer

    empty = torch.empty(batch, kv_heads, 0, head_dim)
    layers = getattr(cache, "layers", None) if cache is not None else None
    if cache is None or (layers is not None and layer_idx >= len(layers)):
        return (empty, empty) if cache is None or getattr(cache, "layer_class_to_replicate", None) else None
    if layers is None:
        return None
    held = layers[layer_idx]
    if not isinstance(held, DynamicLayer) or getattr(held, "is_sliding", False):
        return None
    if not held.is_initialized or held.keys is None or held.keys.numel() == 0:
        return empty, empty
    keys, values = held.keys, held.values
    if keys.dtype not in (torch.float32, CACHE_DTYPE) or keys.shape[0] != batch or keys.shape[1] != kv_heads \
            or keys.dim() != 4:
        return None
    return keys, values


def _bool_mask(attention_mask, positions: int):
    """transformers' 4-D mask as a contiguous bool [batch, 1, tokens, positions] (True: may attend), None for no mask
    (causal), False when it is not one the kernel takes."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4 or attention_mask.shape[-1] != positions:
        return False
    if attention_mask.dtype != torch.bool:  # eager's additive mask: 0 where allowed
        attention_mask = attention_mask == 0
    return attention_mask.expand(-1, 1, -1, -1).contiguous()
