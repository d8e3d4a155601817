"""A decode step of a model whose every decoder layer runs on d3's kernels (native_layer.NativeLayer), without
transformers' forward around it.

`NativeDecoder` runs the embeddings, the rotary embedding, the layers in the model's layer list as it is now
(skipped ones included), the final norm and the LM head: the same operations as the model's forward, hence the same
logits (tests/core/decode/test_native_step.py), without its ~1 ms of Python per step. The engine uses it for decode steps
without padding (engine.decode_one_token).
"""

from __future__ import annotations

import torch

from d3cli.core.decode.skipping import SkippedLayer
from d3cli.core.model.kv_buffers import ReservingCache
from d3cli.core.model.model_facts import find_decoder_layers
from d3cli.core.model.native_layer import CACHE_DTYPE, NativeLayer

NATIVE_MODELS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "D3ForCausalLM")


class NativeDecoder:
    """The decode step of a model whose decoder layers all have a NativeLayer (see the module docstring)."""

    def __init__(self, model):
        self.embed, self.head = model.get_input_embeddings(), model.get_output_embeddings()
        self.rotary, self.norm = model.model.rotary_emb, model.model.norm
        self.layers = find_decoder_layers(model)

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: ReservingCache) -> torch.Tensor:
        """Next-token logits [batch, vocab] (float32) of one new token per row, no padding, through the layers the
        model's layer list holds now: the native layers in one kernel call (torch.ops.d3.decoder_layers) up to a
        stand-in that applies a bridge, which runs in Python between two calls; a stand-in without one passes its
        input through, so it simply drops out of the call."""
        hidden = self.embed(input_ids)
        position_embeddings = self.rotary(hidden, position_ids=position_ids)
        cos, sin = (part.contiguous() for part in position_embeddings)
        run: list[NativeLayer] = []
        for layer in self.layers:
            native = getattr(layer, "native", None)
            if native is not None:
                run.append(native)
                continue
            if isinstance(layer, SkippedLayer) and layer.bridge is None:
                continue
            hidden = self._run(run, hidden, cos, sin, cache)
            run = []
            hidden = layer(hidden, attention_mask=None, position_ids=position_ids, cache=cache, use_cache=True,
                           position_embeddings=position_embeddings)
        hidden = self._run(run, hidden, cos, sin, cache)
        return self.head(self.norm(hidden))[:, -1, :].float()

    @staticmethod
    def _run(run: list[NativeLayer], hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             cache: ReservingCache) -> torch.Tensor:
        """The native layers of `run`, one after another, in one kernel call."""
        if not run:
            return hidden
        batch, tokens, _ = hidden.shape
        keys, values, pasts = [], [], []
        for native in run:
            key_buffer, value_buffer, past = cache.reserve(native.layer.layer_idx, native.kv_shape(batch, tokens),
                                                           CACHE_DTYPE, hidden.device)
            keys.append(key_buffer)
            values.append(value_buffer)
            pasts.append(past)
        out = torch.ops.d3.decoder_layers(hidden.contiguous(), keys, values, pasts, cos, sin,
                                          [native.weights for native in run])
        for native, past in zip(run, pasts):
            cache.advance(native.layer.layer_idx, past, tokens)
        return out


def native_decoder(model) -> NativeDecoder | None:
    """The model's NativeDecoder (made once), or None when its class or a decoder layer has no native path."""
    found = model.__dict__.get("_d3_native_decoder", False)
    if found is False:
        layers = list(find_decoder_layers(model))
        fits = type(model).__name__ in NATIVE_MODELS and all(
            getattr(layer, "native", None) is not None or isinstance(layer, SkippedLayer) for layer in layers)
        found = NativeDecoder(model) if fits and any(not isinstance(layer, SkippedLayer) for layer in layers) else None
        model.__dict__["_d3_native_decoder"] = found
    return found
