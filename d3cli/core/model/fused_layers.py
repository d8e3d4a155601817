"""A leaner decoder layer for the Llama family: the same arithmetic as transformers' layer in fewer calls.

At batch 1 a decode step on the CPU spends as much time calling things as computing: transformers' Llama layer makes
~10 module calls and ~60 tensor operations for 7 matrix products. `FusedDecoderLayer` computes the same thing with
the query, key and value projections as one matrix product, the gate and up projections as one, rotary embeddings
applied to queries and keys at once, the norms inlined, and no module call but the projections' own. Every
element is computed by the same operations in the same order as transformers computes it (tests/core/
test_fused_layers.py holds the two against each other), attention goes through transformers' own attention
function for the model's `attn_implementation`, and the KV cache is written through the same `cache.update`.

It stands in the model's layer list in place of the transformers layer (skipping.py swaps it like any layer), so
the model's own forward (embeddings, masks, rotary tables, final norm, LM head) and `model.generate` run it.
Supported: layers shaped as Llama, Mistral, Qwen2 and Qwen3 build theirs (RMSNorm before attention and MLP, gated
SiLU MLP, rotary attention, Qwen3's per-head query/key norms); any other layer is left as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from d3cli.core.model.native_layer import native_layer

SUPPORTED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                    "D3DecoderLayer")  # the last: d3_model.py's
SUPPORTED_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "D3RMSNorm")
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def supports(layer: nn.Module) -> bool:
    """True when `layer` is a transformers layer this module computes exactly."""
    if type(layer).__name__ not in SUPPORTED_LAYERS:
        return False
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = [getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)]
    if attention is None or mlp is None or any(type(norm).__name__ not in SUPPORTED_NORMS for norm in norms):
        return False
    for name in ("q_norm", "k_norm"):
        norm = getattr(attention, name, None)
        if norm is not None and type(norm).__name__ not in SUPPORTED_NORMS:
            return False
    needed = (*QKV, "self_attn.o_proj", *GATE_UP, "mlp.down_proj")
    if any(_find(layer, name) is None for name in needed):
        return False
    config = getattr(attention, "config", None)
    return getattr(config, "hidden_act", "silu") == "silu" and not getattr(config, "mlp_bias", False)


def _find(layer: nn.Module, name: str):
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def _attention_function(config):
    """The attention function transformers' own layer calls for this config (sdpa, eager, ...)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm, operation for operation: float32 statistics, the weight applied in the input's
    dtype."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(dtype)


def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [batch, tokens, heads, head_dim] states; cos/sin are [batch, tokens, head_dim]."""
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return states * cos[:, :, None] + rotated * sin[:, :, None]


class FusedDecoderLayer(nn.Module):
    """One decoder layer of the Llama family with fused projections (see the module docstring).

    `qkv` and `gate_up` are lists of projection modules whose outputs, concatenated, are the query, key and value
    (the gate and up) projections in that order: one module when every part has the same stored kind, more when a
    GGUF file mixes types within a layer."""

    def __init__(self, layer: nn.Module, qkv: Sequence[nn.Module], o_proj: nn.Module, gate_up: Sequence[nn.Module],
                 down_proj: nn.Module):
        super().__init__()
        attention, mlp = layer.self_attn, layer.mlp
        config = attention.config
        self.config = config
        self.layer_idx = attention.layer_idx
        self.attention_type = getattr(layer, "attention_type", None)
        self.head_dim = attention.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = attention.num_key_value_groups
        self.scaling = attention.scaling
        self.is_causal = True
        self.sliding_window = getattr(attention, "sliding_window", None)
        self.intermediate_size = mlp.intermediate_size
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm, self.k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        self.qkv, self.gate_up = nn.ModuleList(qkv), nn.ModuleList(gate_up)
        self.o_proj, self.down_proj = o_proj, down_proj
        self.act_fn = mlp.act_fn
        self._attend = None  # transformers' attention function, found at the first call that needs it
        # transformers' sdpa path hands a single query to torch with enable_gqa, 2-3x slower on the CPU than the same
        # attention with the query heads grouped under their key/value head (what it does itself when masked)
        self.packs_queries = config._attn_implementation == "sdpa" and self.num_key_value_groups > 1
        self.native = native_layer(self)  # the whole layer as one call of d3's kernel, where it can be
        self.eval()

    @property
    def attend(self):
        """transformers' attention function for the config: imported only by a forward the kernel does not take
        (a whole native model never imports transformers' modelling code)."""
        if self._attend is None:
            self._attend = _attention_function(self.config)
        return self._attend

    @staticmethod
    def _project(parts: nn.ModuleList, hidden: torch.Tensor) -> torch.Tensor:
        if len(parts) == 1:
            return parts[0](hidden)
        return torch.cat([part(hidden) for part in parts], dim=-1)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, use_cache: bool | None = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, past_key_values=None,
                **kwargs) -> torch.Tensor:
        cache = cache if cache is not None else past_key_values
        if self.native is not None:
            out = self.native.forward(hidden_states, attention_mask, position_embeddings, cache)
            if out is not None:
                return out
        batch, tokens, _ = hidden_states.shape
        residual = hidden_states
        normed = rms_norm(hidden_states, self.input_layernorm.weight, self.input_layernorm.variance_epsilon)
        heads = self._project(self.qkv, normed).view(batch, tokens, -1, self.head_dim)
        query, key, value = heads.split([self.num_heads, self.num_key_value_heads, self.num_key_value_heads], dim=2)
        cos, sin = position_embeddings
        if self.q_norm is not None:
            query = rms_norm(query, self.q_norm.weight, self.q_norm.variance_epsilon)
            key = rms_norm(key, self.k_norm.weight, self.k_norm.variance_epsilon)
            query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        else:  # queries and keys rotated in one go: the same operations on each element
            rotated = rotate(heads[:, :, : self.num_heads + self.num_key_value_heads], cos, sin)
            query, key = rotated.split([self.num_heads, self.num_key_value_heads], dim=2)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if tokens == 1 and self.packs_queries:  # one query per row: its heads grouped by their key/value head
            grouped = query.reshape(batch, self.num_key_value_heads, self.num_key_value_groups, self.head_dim)
            attended = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                                        scale=self.scaling)
        else:
            attended, _ = self.attend(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling,
                                      sliding_window=self.sliding_window, **kwargs)
        hidden_states = residual + self.o_proj(attended.reshape(batch, tokens, -1))
        residual = hidden_states
        normed = rms_norm(hidden_states, self.post_attention_layernorm.weight,
                          self.post_attention_layernorm.variance_epsilon)
        gate, up = self._project(self.gate_up, normed).split([self.intermediate_size, self.intermediate_size], -1)
        return residual + self.down_proj(self.act_fn(gate) * up)

