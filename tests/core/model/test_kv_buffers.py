"""Buffers that grow in place standing alone (d3's own model's cache) behave as transformers' layer does, and the
cache answers lengths from the layer that wrote last."""

import torch
from transformers.cache_utils import DynamicLayer

from d3cli.core.model.kv_buffers import GrowingBuffers, OwnCache


def states(positions: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, positions, 4, generator=generator),
            torch.randn(2, 3, positions, 4, generator=generator))


def test_standing_alone_they_hold_what_concatenation_holds_through_crops_and_resets():
    alone, plain = GrowingBuffers(), DynamicLayer()
    for step, positions in enumerate([7, 1, 1, 30, 1]):
        keys, values = states(positions, seed=step)
        out = alone.update(keys, values)
        plain.update(keys, values)
        assert torch.equal(out[0], plain.keys) and torch.equal(out[1], plain.values)
        assert alone.get_seq_length() == plain.get_seq_length()
    alone.crop(-5)
    plain.crop(-5)
    assert torch.equal(alone.keys, plain.keys) and alone.get_seq_length() == 35
    alone.reset()
    assert alone.get_seq_length() == 0 and alone.keys is None and not alone.is_initialized


def test_the_own_cache_reserves_for_a_kernel_and_answers_from_the_last_writer():
    cache = OwnCache(3)
    for layer in range(3):
        keys, values, held = cache.reserve(layer, (1, 2, 5, 4), torch.float16, torch.device("cpu"))
        assert held == 0 and keys.shape[2] >= 5
        keys[:, :, :5] = layer
        cache.advance(layer, held, 5)
    assert cache.get_seq_length() == 5 and cache.held_by_every_layer() == 5
    for layer in (0, 2):  # layer 1 skipped from now on
        _, _, held = cache.reserve(layer, (1, 2, 1, 4), torch.float16, torch.device("cpu"))
        cache.advance(layer, held, 1)
    assert cache.get_seq_length(1) == 6  # from layer 2, which wrote last, not the stale layer 1
    assert cache.held_by_every_layer() == 5
    cache.compact([1])
    assert cache.capacity_bytes() >= cache.kv_bytes() == (6 + 5 + 6) * 2 * 2 * 4 * 2
    assert cache.crop_to(5) and [layer.get_seq_length() for layer in cache.layers] == [5, 5, 5]
    assert torch.equal(cache.layers[2].keys, torch.full((1, 2, 5, 4), 2, dtype=torch.float16))
