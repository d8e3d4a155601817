"""d3's own model of the Llama family, built without importing transformers' modelling code.

Importing transformers' Llama modelling module takes about 2.5 s on two CPU cores, more than the rest of a warm
start. Where every decoder layer runs on d3's kernels (native_layer.py), transformers' model is only a skeleton around
them: an embedding, rotary tables, a mask, the layer list, a final norm and an LM head. `D3ForCausalLM` is that
skeleton, with transformers' module tree and parameter names (so weights.apply_weights fills and fuses it exactly as
it fills transformers' model) and transformers' forward, operation for operation:

    embed_tokens(input_ids)
    rotary tables     position · inv_freq, cos and sin scaled by the attention scaling (inv_freq and the scaling as
                      transformers computed them for this config, recorded in the model's cache: d3_record.py)
    mask              None where transformers' sdpa mask is None (no padding and one query, or a fresh causal
                      prefill), else the same boolean [batch, 1, queries, keys] mask
    layers            each FusedDecoderLayer (or a D3 stand-in) in the layer list as it is now
    norm, lm_head     on the last `logits_to_keep` positions

Its cache is kv_buffers.OwnCache (no transformers either). It decodes; it has no `generate` (commands that compare
against transformers' `generate` load transformers' model). tests/core/model/test_d3_model.py holds its logits, masks and
replies equal to transformers' model built from the same file.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from d3cli.core.model.fused_layers import rms_norm
from d3cli.core.model.kv_buffers import OwnCache

META = torch.device("meta")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # config model_type values this model builds
TRANSFORMERS_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                        "qwen3": "Qwen3ForCausalLM"}


class D3Config:
    """A model's config.json (as transformers wrote it from its own config object: every field filled in) as
    attributes, with the few methods d3 calls on a transformers config."""

    _attn_implementation = "sdpa"

    def __init__(self, values: dict):
        self.__dict__.update(values)
        if getattr(self, "head_dim", None) is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def get_text_config(self, decoder: bool = False) -> D3Config:
        return self

    @property
    def per_layer_config(self) -> list:
        return [self] * self.num_hidden_layers

    def to_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if not key.startswith("_")}


class D3RMSNorm(nn.Module):
    """transformers' Llama RMSNorm (fused_layers.rms_norm)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=META))
        self.variance_epsilon = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden, self.weight, self.variance_epsilon)


class D3RotaryEmbedding(nn.Module):
    """transformers' rotary embedding of a static rope type, from its recorded inverse frequencies and scaling."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = attention_scaling

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=hidden.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=hidden.dtype), sin.to(dtype=hidden.dtype)


class D3Attention(nn.Module):
    """The projections and facts of one attention block (FusedDecoderLayer takes them over)."""

    def __init__(self, config: D3Config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.sliding_window = None
        qkv_bias = True if config.model_type == "qwen2" else bool(getattr(config, "attention_bias", False))
        out_bias = False if config.model_type == "qwen2" else bool(getattr(config, "attention_bias", False))
        heads, kv_heads, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
        self.q_proj = empty_linear(hidden, heads * self.head_dim, qkv_bias)
        self.k_proj = empty_linear(hidden, kv_heads * self.head_dim, qkv_bias)
        self.v_proj = empty_linear(hidden, kv_heads * self.head_dim, qkv_bias)
        self.o_proj = empty_linear(heads * self.head_dim, hidden, out_bias)
        if config.model_type == "qwen3":
            self.q_norm = D3RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = D3RMSNorm(self.head_dim, config.rms_norm_eps)


class D3MLP(nn.Module):
    def __init__(self, config: D3Config):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.intermediate_size = config.intermediate_size
        self.gate_proj = empty_linear(config.hidden_size, config.intermediate_size, bias)
        self.up_proj = empty_linear(config.hidden_size, config.intermediate_size, bias)
        self.down_proj = empty_linear(config.intermediate_size, config.hidden_size, bias)
        self.act_fn = nn.SiLU()


class D3DecoderLayer(nn.Module):
    """A decoder layer's weights in transformers' tree; loading replaces it with a FusedDecoderLayer."""

    attention_type = "full_attention"

    def __init__(self, config: D3Config, layer_idx: int):
        super().__init__()
        self.self_attn = D3Attention(config, layer_idx)
        self.mlp = D3MLP(config)
        self.input_layernorm = D3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = D3RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a D3DecoderLayer only holds weights: loading makes it a FusedDecoderLayer")


class D3Model(nn.Module):
    def __init__(self, config: D3Config, inv_freq: torch.Tensor, attention_scaling: float):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None),
                                         _weight=torch.empty(config.vocab_size, config.hidden_size, device=META))
        self.layers = nn.ModuleList(D3DecoderLayer(config, index) for index in range(config.num_hidden_layers))
        self.norm = D3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = D3RotaryEmbedding(inv_freq, attention_scaling)


class D3ForCausalLM(nn.Module):
    """See the module docstring. Built with its parameters on the meta device (`empty`), then filled."""

    def __init__(self, config: D3Config, inv_freq: torch.Tensor, attention_scaling: float):
        super().__init__()
        self.config = config
        self.model = D3Model(config, inv_freq, attention_scaling)
        self.lm_head = empty_linear(config.hidden_size, config.vocab_size, False)
        self.generation_config = SimpleNamespace()

    @classmethod
    def empty(cls, config: D3Config, inv_freq: torch.Tensor, attention_scaling: float) -> D3ForCausalLM:
        """The model with its parameters on the meta device (no memory) and its rotary table real."""
        model = cls(config, inv_freq.float(), attention_scaling)
        if getattr(config, "tie_word_embeddings", False):
            model.lm_head.weight = model.model.embed_tokens.weight
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_decoder(self) -> nn.Module:
        return self.model

    def new_cache(self) -> OwnCache:
        return OwnCache(self.config.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: OwnCache | None = None, use_cache: bool = True,
                logits_to_keep: int = 0, past_key_values: OwnCache | None = None, **kwargs) -> SimpleNamespace:
        """The next-token logits of every position (the last `logits_to_keep` only, when given) as `.logits`."""
        cache = cache if cache is not None else past_key_values
        hidden = self.model.embed_tokens(input_ids)
        past = cache.get_seq_length() if cache is not None else 0
        tokens = input_ids.shape[1]
        if position_ids is None:
            position_ids = (torch.arange(tokens, device=hidden.device) + past).unsqueeze(0)
        mask = causal_mask(attention_mask, input_ids.shape[0], tokens, past, hidden.device)
        position_embeddings = self.model.rotary_emb(hidden, position_ids)
        for layer in self.model.layers[: self.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                           position_ids=position_ids, cache=cache, use_cache=use_cache)
        hidden = self.model.norm(hidden)
        kept = hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        return SimpleNamespace(logits=self.lm_head(kept), cache=cache)


def empty_linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """An `nn.Linear` whose parameters are on the meta device, made without initialising them (torch's
    initialisers import its compiler, about 1 s)."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = in_features, out_features
    linear.weight = nn.Parameter(torch.empty(out_features, in_features, device=META))
    linear.bias = nn.Parameter(torch.empty(out_features, device=META)) if bias else None
    return linear


def causal_mask(attention_mask: torch.Tensor | None, batch: int, tokens: int, past: int,
                device: torch.device) -> torch.Tensor | None:
    """transformers' sdpa mask for full attention: None when no key is padding and either one query comes or the
    cache is empty (sdpa's own causal mask then applies), else [batch, 1, tokens, past + tokens] booleans, True
    where a query may attend a key: an earlier or the same position that is not padding."""
    keys = past + tokens
    padding = None if attention_mask is None else attention_mask[:, -keys:].to(device=device, dtype=torch.bool)
    no_padding = padding is None or bool(padding.all())
    if no_padding and (tokens == 1 or past == 0):
        return None
    query_positions = torch.arange(past, keys, device=device)[:, None]
    allowed = torch.arange(keys, device=device)[None, :] <= query_positions  # [tokens, keys]
    mask = allowed[None, None].expand(batch, 1, tokens, keys)
    if padding is not None:
        mask = mask & padding[:, None, None, :]
    return mask
