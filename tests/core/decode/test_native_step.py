"""The native decode step: the model's own forward to the last bit, through skipped layers and bridges."""

import pytest
import torch
from conftest import TINY_SIZES
from native_models import PROMPT, tiny

from d3cli import kernels
from d3cli.core.decode.bridges import Bridge
from d3cli.core.decode.engine import make_prompt_batch
from d3cli.core.decode.kv_cache import DepthDecayCache
from d3cli.core.decode.native_step import native_decoder
from d3cli.core.decode.skipping import LayerSkipper
from d3cli.core.model.model_facts import find_decoder_layers

pytestmark = [pytest.mark.skipif(not kernels.available(), reason=f"d3's kernels: {kernels.load()}"),
              pytest.mark.usefixtures("thread_team")]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_native_step_is_the_models_forward_to_the_last_bit_with_skips_and_bridges(family):
    model = tiny(family)
    layers = len(find_decoder_layers(model))
    hidden_size = TINY_SIZES["hidden_size"]
    bridge = Bridge(2, 3, weight=torch.eye(hidden_size) * 0.1)
    native = native_decoder(model)
    batch = make_prompt_batch([PROMPT], pad_token_id=2, device="cpu")
    for kept, bridges in [(range(layers), {}), ((0, 1, 4, 5), {}), ((0, 1, 4, 5), {(2, 3): bridge})]:
        caches = [DepthDecayCache(config=model.config) for _ in range(2)]
        with torch.inference_mode(), LayerSkipper(model, bridges) as skipper:
            for cache in caches:
                model(input_ids=batch.input_ids, position_ids=batch.position_ids, cache=cache, use_cache=True)
            skipper.keep(frozenset(kept))
            position = batch.position_ids[:, -1:] + 1
            token = torch.tensor([[42]])
            for _ in range(3):
                expected = model(input_ids=token, position_ids=position, cache=caches[0], use_cache=True).logits
                assert torch.equal(native.step(token, position, caches[1]), expected[:, -1].float())
                position, token = position + 1, token + 7
