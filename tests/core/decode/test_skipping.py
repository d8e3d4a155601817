"""Where layers are skipped: the stand-ins in the model's own layer list (with and without a bridge), a forward that
starts at a later layer, and the per-position skip of a teacher-forced forward, each held against the model run by
hand with the same layers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_model
from torch import nn
from transformers import DynamicCache

from d3cli.core.decode.bridges import Bridge
from d3cli.core.decode.engine import cache_argument
from d3cli.core.decode.skipping import LayerSkipper, SkippedLayer, bridge_positions, skipped_at_positions, starting_at
from d3cli.core.model.model_facts import find_decoder_layers

IDS = torch.tensor([[1, 17, 93, 5, 60, 41, 8, 77, 12]])


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama", vocab_size=128, num_layers=6)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids, use_cache=False).logits


class Apply(nn.Module):
    """A decoder layer's place taken by a function of its input."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, hidden_states, *args, **kwargs):
        return self.function(hidden_states)


def with_layers(model, layers) -> nn.Module:
    """A copy of `model` whose decoder layers are `layers` (a copy's own modules, picked by index, or stand-ins)."""
    other = copy.deepcopy(model)
    own = find_decoder_layers(other)
    replacement = [own[item] if isinstance(item, int) else item for item in layers]
    for index in range(len(own)):
        own[index] = replacement[index] if index < len(replacement) else Apply(lambda hidden: hidden)
    return other


def a_bridge(first: int, last: int, seed: int = 0) -> Bridge:
    generator = torch.Generator().manual_seed(seed)
    return Bridge(first, last, weight=0.05 * torch.randn(64, 64, generator=generator))


def test_kept_layers_run_and_the_others_pass_their_input_through(model):
    full = logits(model)
    with LayerSkipper(model) as skipper:
        skipper.keep({0, 1, 4, 5})
        layers = find_decoder_layers(model)
        assert [type(layer) is SkippedLayer for layer in layers] == [False, False, True, True, False, False]
        skipped = logits(model)
    assert torch.equal(skipped, logits(with_layers(model, [0, 1, 4, 5])))
    assert not torch.allclose(skipped, full)
    assert not any(isinstance(layer, SkippedLayer) for layer in find_decoder_layers(model))
    assert torch.equal(logits(model), full)  # the model's own layers are back


def test_keep_touches_only_what_changes_and_restore_gives_back_the_very_same_modules(model):
    original = list(find_decoder_layers(model))
    skipper = LayerSkipper(model)
    skipper.keep(range(6))
    assert list(find_decoder_layers(model)) == original and skipper.kept == frozenset(range(6))
    skipper.keep([0, 5])
    stand_in = find_decoder_layers(model)[3]
    skipper.keep([0, 4, 5])  # layer 3 stays skipped: its stand-in is not replaced
    assert find_decoder_layers(model)[3] is stand_in and find_decoder_layers(model)[4] is original[4]
    skipper.restore()
    assert all(now is before for now, before in zip(find_decoder_layers(model), original))


def test_the_last_stand_in_of_a_skipped_run_applies_its_bridge(model):
    bridge = a_bridge(2, 3)
    with LayerSkipper(model, {(2, 3): bridge, (1, 1): a_bridge(1, 1, seed=1)}) as skipper:
        skipper.keep({0, 1, 4, 5})
        assert skipper.stand_ins[3].bridge is bridge and skipper.stand_ins[2].bridge is None
        assert "bridges=2..3" in repr(skipper.stand_ins[3])
        bridged = logits(model)
        skipper.keep({0, 2, 3, 4, 5})  # now run 1..1 is skipped: only its bridge is set
        assert skipper.stand_ins[3].bridge is None and skipper.stand_ins[1].bridge is not None
    expected = with_layers(model, [0, 1, Apply(lambda hidden: hidden), Apply(bridge.apply), 4, 5])
    assert torch.allclose(bridged, logits(expected), atol=1e-6)
    assert not torch.allclose(bridged, logits(with_layers(model, [0, 1, 4, 5])))


def test_a_second_skipper_is_refused_while_stand_ins_are_in_place(model):
    with LayerSkipper(model) as skipper:
        skipper.keep({0, 5})
        with pytest.raises(RuntimeError, match="still has skipped layers from an unfinished decode"):
            LayerSkipper(model)
    LayerSkipper(model)  # after restoring, a new one is fine


@pytest.mark.parametrize("first", [0, 1, 3, 5])
def test_starting_at_a_later_layer_with_its_input_gives_the_full_forward(model, first):
    with torch.inference_mode():
        full = model(IDS, use_cache=False, output_hidden_states=True)
    original = list(find_decoder_layers(model))
    with starting_at(model, first, full.hidden_states[first]):
        started = logits(model)
    assert torch.allclose(started, full.logits, atol=1e-6)
    assert all(now is before for now, before in zip(find_decoder_layers(model), original))


def test_a_forward_starting_later_never_runs_the_layers_before(model):
    with torch.inference_mode():
        hidden = model(IDS, use_cache=False, output_hidden_states=True).hidden_states[3]
    calls = []
    handles = [layer.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
               for index, layer in enumerate(find_decoder_layers(model))]
    try:
        with starting_at(model, 3, hidden):
            logits(model)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [3, 4, 5]


def test_skipping_a_layer_at_every_position_equals_the_skipper(model):
    skipped = torch.zeros(6, IDS.shape[1], dtype=torch.bool)
    skipped[[2, 3]] = True
    with skipped_at_positions(model, skipped):
        scored = logits(model)
    assert torch.allclose(scored, logits(with_layers(model, [0, 1, 4, 5])), atol=1e-5)


def test_skipping_at_the_last_position_equals_decoding_that_token_without_the_layer(model):
    """Teacher forcing with layers 3..4 skipped at the last position only == a full-depth prefill of the others and
    a cached decode step of the last token that runs layers 0-2 and 5, bridged or not."""
    for bridges in (None, {(3, 4): a_bridge(3, 4)}):
        skipped = torch.zeros(6, IDS.shape[1], dtype=torch.bool)
        skipped[3:5, -1] = True
        with skipped_at_positions(model, skipped, bridges=bridges), torch.inference_mode():
            scored = model(IDS, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(IDS[:, :-1], use_cache=True, **cache_argument(model, cache))
            with LayerSkipper(model, bridges) as skipper:
                skipper.keep({0, 1, 2, 5})
                step = model(IDS[:, -1:], use_cache=True, **cache_argument(model, cache)).logits
        assert torch.allclose(scored[:, :-1], logits(model)[:, :-1], atol=1e-5)  # earlier positions: full depth
        assert torch.allclose(scored[:, -1], step[:, 0], atol=1e-4)


def test_observe_sees_every_layer_before_the_replacement_and_a_wrong_mask_is_refused(model):
    hooks_before = [len(layer._forward_hooks) for layer in find_decoder_layers(model)]
    seen = []
    skipped = torch.ones(6, IDS.shape[1], dtype=torch.bool)
    with skipped_at_positions(model, skipped, observe=lambda index, hidden_in, hidden_out: seen.append(
            (index, torch.equal(hidden_in, hidden_out)))):
        logits(model)
    assert seen == [(index, False) for index in range(6)]  # each layer's own output, not the skip's
    with pytest.raises(ValueError, match="skip mask is for 5 layers, the model has 6"):
        with skipped_at_positions(model, torch.zeros(5, 3, dtype=torch.bool)):
            pass
    assert [len(layer._forward_hooks) for layer in find_decoder_layers(model)] == hooks_before  # all removed


def test_bridge_positions_finds_the_runs_that_end_at_each_layer():
    plan = torch.tensor([[False, False, False],   # layer 0
                         [True, True, False],     # layer 1: runs 1..2 (position 0) and 1..1 (position 1) start
                         [True, False, True],     # layer 2: 1..2 ends (position 0); 2..3 starts (position 2)
                         [False, True, True]])    # layer 3: 3..3 (position 1) and 2..3 (position 2) end here
    found = bridge_positions(plan, {(1, 2): "A", (1, 1): "B", (2, 3): "C"})
    as_lists = {layer: [(bridge, positions.tolist()) for bridge, positions in pairs] for layer, pairs in found.items()}
    assert as_lists == {1: [("B", [1])], 2: [("A", [0])], 3: [("C", [2])]}  # no bridge for 3..3: none found
    assert bridge_positions(plan, {}) == {} and bridge_positions(plan, None) == {}
    assert bridge_positions(None, {(1, 2): "A"}) == {}
