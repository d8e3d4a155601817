"""The cache layer that grows in place: same keys and values as concatenation, without a copy per step."""

import torch
from transformers.cache_utils import DynamicLayer

from d3cli.core.decode.kv_cache import DepthDecayCache, GrowingLayer


def states(positions: int, batch: int = 2, heads: int = 3, dim: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, positions, dim, generator=generator),
            torch.randn(batch, heads, positions, dim, generator=generator))


def feed(layers, *chunks):
    for keys, values in chunks:
        for layer in layers:
            out = layer.update(keys, values)
    return out


def assert_same(growing: GrowingLayer, plain: DynamicLayer):
    assert torch.equal(growing.keys, plain.keys) and torch.equal(growing.values, plain.values)
    assert growing.get_seq_length() == plain.get_seq_length()


def test_appends_match_concatenation_and_reallocate_only_geometrically():
    growing, plain = GrowingLayer(), DynamicLayer()
    feed((growing, plain), states(40))
    capacities = [growing._key_buffer.shape[-2]]
    for step in range(300):
        keys, values = feed((growing, plain), states(1, seed=step + 1))
        assert torch.equal(keys, plain.keys) and torch.equal(values, plain.values)
        if growing._key_buffer.shape[-2] != capacities[-1]:
            capacities.append(growing._key_buffer.shape[-2])
    assert_same(growing, plain)
    assert capacities == [64, 97, 147, 222, 334, 502]  # six allocations for 340 positions, not one per step


def test_crop_then_append_overwrites_the_cropped_positions():
    growing, plain = GrowingLayer(), DynamicLayer()
    feed((growing, plain), states(30), states(5, seed=1))
    for layer in (growing, plain):
        layer.crop(-7)
    feed((growing, plain), states(3, seed=2), states(1, seed=3))
    assert_same(growing, plain)


def test_batch_selection_and_reordering_are_adopted():
    growing, plain = GrowingLayer(), DynamicLayer()
    feed((growing, plain), states(10, batch=3))
    for layer in (growing, plain):
        layer.batch_select_indices(torch.tensor([2, 0]))
    feed((growing, plain), states(1, batch=2, seed=1))
    for layer in (growing, plain):
        layer.reorder_cache(torch.tensor([1, 0]))
    feed((growing, plain), states(2, batch=2, seed=2))
    assert_same(growing, plain)


def test_a_cache_filled_in_inference_mode_grows_outside_it():
    growing, plain = GrowingLayer(), DynamicLayer()
    with torch.inference_mode():
        feed((growing, plain), states(5))
    with torch.no_grad():
        feed((growing, plain), states(1, seed=1))
    assert_same(growing, plain)


def test_reset_starts_empty():
    growing = GrowingLayer()
    feed((growing,), states(5))
    growing.reset()
    assert growing.get_seq_length() == 0
    keys, _ = feed((growing,), states(2, seed=4))
    assert torch.equal(keys, states(2, seed=4)[0])


def test_the_depth_decay_cache_uses_growing_layers_and_compacts_stopped_ones(tiny_models):
    model = tiny_models["llama"]
    cache = DepthDecayCache(config=model.config)
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    for index in range(len(cache.layers)):
        cache.update(*states(70, batch=1, heads=2, dim=8, seed=index), layer_idx=index)
    assert cache.capacity_bytes() > cache.kv_bytes()
    cache.compact(range(len(cache.layers)))
    assert cache.capacity_bytes() == cache.kv_bytes() == len(cache.layers) * 2 * 70 * 2 * 8 * 4
    assert cache.get_seq_length() == 70


def test_a_sliding_window_layer_keeps_the_models_own_kind():
    from transformers import Gemma2Config

    config = Gemma2Config(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=8, vocab_size=64, sliding_window=4)
    kinds = {type(layer).__name__ for layer in DepthDecayCache(config=config).layers}
    assert kinds == {"GrowingLayer", "DynamicSlidingWindowLayer"}
