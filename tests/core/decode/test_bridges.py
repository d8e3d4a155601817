"""Bridges: exact under the cache, the same in scoring and decoding, never at full depth, and fitted correctly.

The reference here is written independently of d3's bridging code: a cache-free forward of the whole sequence in
which, position by position, a skipped layer's output is its input, except at the last layer of a skipped run,
whose output is the run's input plus that input times the run's matrix.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES

from core.decode.test_engine import PROMPTS, d3_tokens, forward_without_cache, hf_greedy, num_layers
from d3cli.core.decode import skipping
from d3cli.core.decode.bridges import Bridge, BridgeFitter, Bridges, bridges_used, low_rank
from d3cli.core.decode.engine import generate_steps, make_prompt_batch
from d3cli.core.decode.schedule import DecaySchedule, LinearSchedule, StaticSchedule, runs_of_drop_order
from d3cli.core.model.model_facts import find_decoder_layers
from d3cli.evaluation.scoring import ContinuationScorer, ScoringText, plan_for_schedule, teacher_forced_nll

TEXT = ScoringText("t", (1, 4093, 314, 260, 3575, 282, 4649, 47),
                   (504, 2988, 1694, 2030, 3681, 260, 2115, 23, 2564, 282, 614, 7297, 30, 9519, 28, 260, 3575,
                    282, 4649, 47))


def random_bridges(model, schedule: DecaySchedule, steps: int, scale: float = 0.3, seed: int = 0) -> Bridges:
    """A random matrix for every run the schedule skips in `steps` steps (big enough to move the logits)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = model.config.get_text_config(decoder=True).hidden_size
    runs = {run for step in range(steps) for run in schedule.runs_at(step)}
    return Bridges(Bridge(first, last, weight=scale * torch.randn(hidden, hidden, generator=generator) / hidden ** 0.5)
                   for first, last in sorted(runs))


def reference_logits(model, batch, generated, schedule):
    """Every step's logits from one cache-free forward, with each position's skips and bridges done by hand."""
    steps = generated.shape[1]
    prompt_width = batch.input_ids.shape[1]
    layers = find_decoder_layers(model)
    skipped_by_position = {}  # position -> the set of layers its step skips
    for step in range(1, steps):
        skipped_by_position[prompt_width + step - 1] = set(range(len(layers))) - set(schedule.kept_layers(step))

    def hook_for(layer_index):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            result = output.clone()
            for position, skipped in skipped_by_position.items():
                if layer_index not in skipped:
                    continue
                if layer_index + 1 in skipped:  # not the run's last layer: pass the input on
                    result[:, position] = hidden_in[:, position]
                    continue
                first = layer_index
                while first - 1 in skipped:
                    first -= 1
                matrix = schedule.bridge_maps[(first, layer_index)].weight
                result[:, position] = hidden_in[:, position] + hidden_in[:, position] @ matrix
            return result
        return hook

    return forward_without_cache(model, batch, generated, hook_for)


def cached_minus_reference(model, prompts, schedule, steps) -> float:
    batch = make_prompt_batch(prompts, pad_token_id=2, device="cpu")
    run = list(generate_steps(model, batch, schedule, max_new_tokens=steps, pad_token_id=2))
    generated = torch.stack([step.token_ids for step in run], dim=1)
    cached = torch.stack([step.logits for step in run], dim=1)
    return (cached - reference_logits(model, batch, generated, schedule)).abs().max().item()


def bridged_schedule(model, steps=20, **options) -> DecaySchedule:
    options = {"alpha": 0.8, "min_layers": 2, "head": 1, "tail": 1, **options}
    schedule = DecaySchedule.build(num_layers(model), **options)
    return schedule.with_bridge_maps(random_bridges(model, schedule, steps))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("order", ["middle", "late"])
def test_cached_decoding_with_bridges_equals_the_reference(family, order, tiny_models):
    model = tiny_models[family]
    schedule = bridged_schedule(model, skip_order=order)
    assert len({run for step in range(20) for run in schedule.runs_at(step)}) > 2, "several runs must be bridged"
    for prompts in (PROMPTS[:1], PROMPTS):  # one row, and a ragged batch
        assert cached_minus_reference(model, prompts, schedule, steps=20) < 1e-4
    plain = schedule.with_bridge_maps(None)
    batch = make_prompt_batch(PROMPTS[:1], pad_token_id=2, device="cpu")
    bridged_logits = torch.stack([s.logits for s in generate_steps(model, batch, schedule, max_new_tokens=12)])
    plain_logits = torch.stack([s.logits for s in generate_steps(model, batch, plain, max_new_tokens=12)])
    assert (bridged_logits - plain_logits).abs().max().item() > 1e-2, "the bridges must change the logits"


@pytest.mark.parametrize("make", [lambda s: StaticSchedule.like(s, 3), lambda s: LinearSchedule.like(s, 0.5)],
                         ids=["static", "linear"])
def test_baselines_carry_the_bridges_and_stay_exact(make, tiny_models):
    model = tiny_models["llama"]
    base = DecaySchedule.build(8, alpha=0.8, min_layers=2, head=1, tail=1)
    schedule = make(base)
    schedule = schedule.with_bridge_maps(random_bridges(model, schedule, 20))
    assert schedule.bridge_maps is not None
    assert cached_minus_reference(model, PROMPTS, schedule, steps=20) < 1e-4


def test_the_embedded_model_with_bridges_equals_the_reference(embedded):
    import copy

    model = copy.deepcopy(embedded.model).double()
    schedule = DecaySchedule.build(30, alpha=0.9, min_layers=20, head=2, tail=2)
    schedule = schedule.with_bridge_maps(Bridges(
        Bridge(b.first, b.last, weight=b.weight.double()) for b in random_bridges(model, schedule, 16, 0.1).values()))
    assert cached_minus_reference(model, PROMPTS[:2], schedule, steps=16) < 1e-4


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_scoring_with_bridges_equals_cached_decoding_with_bridges(family, tiny_models):
    model = tiny_models[family]
    schedule = bridged_schedule(model, steps=TEXT.steps, alpha=0.85)
    scorer = ContinuationScorer(model, TEXT)
    scored = scorer.nll(plan_for_schedule(schedule, TEXT.steps), bridges=schedule.bridge_maps)
    assert (scored - teacher_forced_nll(model, TEXT, schedule)).abs().max().item() < 1e-4
    assert (scorer.score_schedule(schedule)[0] - scored).abs().max().item() == 0
    plain = scorer.nll(plan_for_schedule(schedule, TEXT.steps))
    assert (scored - plain).abs().max().item() > 1e-3, "the bridges must change the scores"


def test_full_depth_never_applies_a_bridge(tiny_models, tokenizer):
    """α = 1 with bridges is the model's own greedy decoding, token for token."""
    model = tiny_models["llama"]
    steps = DecaySchedule.build(8, alpha=0.7, min_layers=2, head=1, tail=1)
    full = DecaySchedule.build(8, alpha=1.0, head=1, tail=1, min_layers=2).with_bridge_maps(
        random_bridges(model, steps, 20, scale=5.0))
    assert d3_tokens(model, tokenizer, PROMPTS, full, 16) == hf_greedy(model, PROMPTS, 16)


def test_a_skipped_layer_stand_in_bridges_only_where_a_run_ends(tiny_models):
    model = tiny_models["llama"]
    bridges = Bridges(Bridge(first, last, weight=torch.randn(64, 64) / 8) for first, last in ((1, 2), (5, 6), (1, 3)))
    skipper = skipping.LayerSkipper(model, bridges)
    layers = find_decoder_layers(model)
    try:
        skipper.keep([0, 3, 4, 7])  # skips 1-2 and 5-6
        assert layers[1].bridge is None and layers[5].bridge is None, "a run's earlier stand-ins pass through"
        assert layers[2].bridge is bridges[(1, 2)] and layers[6].bridge is bridges[(5, 6)]
        hidden = torch.randn(1, 3, 64)
        assert torch.equal(layers[1](hidden), hidden)
        assert torch.allclose(layers[2](hidden), hidden + hidden @ bridges[(1, 2)].weight)
        skipper.keep([0, 4, 7])  # the first run grows to 1-3: a new bridge, at layer 3 now
        assert layers[2].bridge is None
        assert layers[3].bridge is bridges[(1, 3)] and layers[6].bridge is bridges[(5, 6)]
    finally:
        skipper.restore()
    assert not any(isinstance(layer, skipping.SkippedLayer) for layer in layers)


def test_a_run_without_a_bridge_is_skipped_plainly(tiny_models):
    model = tiny_models["llama"]
    schedule = bridged_schedule(model)
    runs = [run for step in range(20) for run in schedule.runs_at(step)]
    partial = Bridges(bridge for run, bridge in schedule.bridge_maps.items() if run != runs[-1])
    schedule = schedule.with_bridge_maps(partial)
    bridged, plain = bridges_used(schedule, 20)
    assert plain == [runs[-1]] and runs[-1] not in bridged
    # the reference needs a matrix for every run: zero is what plain skipping does
    reference = Bridges([*partial.values(), Bridge(*runs[-1], weight=torch.zeros(64, 64))])
    batch = make_prompt_batch(PROMPTS[:1], pad_token_id=2, device="cpu")
    run = list(generate_steps(model, batch, schedule, max_new_tokens=20))
    generated = torch.stack([step.token_ids for step in run], dim=1)
    cached = torch.stack([step.logits for step in run], dim=1)
    expected = reference_logits(model, batch, generated, schedule.with_bridge_maps(reference))
    assert (cached - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("mistake", ["twice", "every layer", "wrong run", "after the kept layer"])
def test_the_reference_catches_a_misplaced_bridge(mistake, tiny_models, monkeypatch):
    """Each of these wrong placements changes the logits beyond the 1e-4 the real engine keeps."""
    model = tiny_models["llama"]
    schedule = bridged_schedule(model, alpha=0.7, skip_order="middle")
    original_keep = skipping.LayerSkipper.keep

    def wrong_keep(self, kept_layers):
        original_keep(self, kept_layers)
        runs = skipping.skipped_runs(self.kept, self.num_layers)
        for first, last in runs:
            bridge = self.bridges.get((first, last))
            if mistake == "twice":
                self.stand_ins[first].bridge = bridge  # and again at `last`
            elif mistake == "every layer":
                for layer in range(first, last + 1):
                    self.stand_ins[layer].bridge = bridge
            elif mistake == "wrong run":
                other = next(run for run in self.bridges if run != (first, last))
                self.stand_ins[last].bridge = self.bridges[other]
            elif mistake == "after the kept layer":
                self.stand_ins[last].bridge = None
                if last + 1 < self.num_layers and bridge is not None:
                    self.layers[last + 1] = _AfterKept(self.original_layers[last + 1], bridge)

    monkeypatch.setattr(skipping.LayerSkipper, "keep", wrong_keep)
    monkeypatch.setattr(skipping.LayerSkipper, "restore", lambda self: [
        self.layers.__setitem__(index, layer) for index, layer in enumerate(self.original_layers)])
    assert cached_minus_reference(model, PROMPTS[:1], schedule, steps=20) > 1e-3


class _AfterKept(torch.nn.Module):
    def __init__(self, layer, bridge):
        super().__init__()
        self.layer, self.bridge = layer, bridge

    def forward(self, hidden_states, *args, **kwargs):
        output = self.layer(hidden_states, *args, **kwargs)
        return output + hidden_states @ self.bridge.weight


def test_the_fitter_recovers_a_planted_linear_map():
    generator = torch.Generator().manual_seed(1)
    hidden, tokens = 16, 4000
    planted = {(2, 4): torch.randn(hidden, hidden, generator=generator) * 0.2,
               (3, 3): torch.randn(hidden, hidden, generator=generator) * 0.2}
    fitter = BridgeFitter(list(planted), hidden)
    for _ in range(4):  # the sums add up over batches
        states = {layer: torch.randn(tokens // 4, hidden, generator=generator) for layer in range(6)}
        states[5] = states[2] + states[2] @ planted[(2, 4)]
        states[4] = states[3] + states[3] @ planted[(3, 3)]
        fitter.add(states)
    assert fitter.tokens == tokens
    for bridge in fitter.solve(ridge=1e-6):
        assert torch.allclose(bridge.weight, planted[(bridge.first, bridge.last)], atol=1e-3)
    shrunk = {(b.first, b.last): b.weight for b in fitter.solve(ridge=10.0)}
    assert shrunk[(2, 4)].norm() < 0.5 * planted[(2, 4)].norm(), "a large ridge pulls the bridge towards skipping"


def test_a_low_rank_bridge_is_the_truncated_svd():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(12, 12, generator=generator, dtype=torch.float64)
    full = low_rank(1, 2, weight, None)
    assert full.rank is None and torch.allclose(full.weight, weight.float())
    reduced = low_rank(1, 2, weight, 4)
    assert reduced.rank == 4 and reduced.nbytes() == 2 * 12 * 4 * 4
    hidden = torch.randn(5, 12, generator=generator)
    left, values, right = torch.linalg.svd(weight)
    truncated = (left[:, :4] * values[:4]) @ right[:4]
    assert torch.allclose(reduced.delta(hidden), hidden @ truncated.float(), atol=1e-5)
    assert (reduced.delta(hidden) - hidden @ weight.float()).abs().max() > 1e-2


def test_a_drop_order_needs_one_bridge_per_dropped_layer():
    runs = runs_of_drop_order(10, (5, 4, 6, 2, 8), fewest_layers=6)
    # depth 9 drops 5; 8 adds 4 (run 4-5); 7 adds 6 (run 4-6); 6 adds 2 (a new run)
    assert runs == ((5, 5), (4, 5), (4, 6), (2, 2))
    assert len(runs_of_drop_order(30, tuple(range(2, 28)), fewest_layers=4)) == 26
