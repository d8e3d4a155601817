"""A calibration's stages (evaluation/calibrate/stages.py): the model's replies made once and taken from a checkpoint
after, the layer profile refused on replies too short for it, and bridges fitted on the right hidden states."""

from __future__ import annotations

import pytest
import torch

from d3cli.base.errors import UserError
from d3cli.core.model.loader import LoadedModel
from d3cli.evaluation.builtin_prompts import builtin_prompts, encode_builtin
from d3cli.evaluation.calibrate import checkpoint as checkpoint_module
from d3cli.evaluation.calibrate import stages
from d3cli.evaluation.calibrate.checkpoint import CalibrationCheckpoint
from d3cli.evaluation.calibrate.options import CalibrationOptions
from d3cli.evaluation.scoring import ScoringText


@pytest.fixture
def loaded(tiny_models, tokenizer):
    return LoadedModel(tiny_models["llama"], tokenizer, "tiny")


def test_the_corpus_is_the_models_greedy_replies_and_a_checkpoint_keeps_them(loaded, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "cache_home", lambda: tmp_path)
    options = CalibrationOptions(prompts=3, reply_tokens=18, batch_size=2)
    prompts = builtin_prompts(3)
    checkpoint = CalibrationCheckpoint({"name": "tiny"}, options)
    done = []
    texts = stages.generate_corpus(loaded, prompts, options, lambda stage, amount: done.append((stage, amount)),
                                   checkpoint)
    assert [text.id for text in texts] == ["builtin/0", "builtin/1", "builtin/2"]
    assert {stage for stage, _ in done} == {"corpus"} and sum(amount for _, amount in done) == 3 * 18
    for text, (kind, prompt) in zip(texts, prompts):
        assert list(text.prompt_ids) == encode_builtin(loaded.tokenizer, kind, prompt)
    first = texts[0]
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([[*first.prompt_ids, *first.continuation_ids]])).logits[0]
    assert logits[len(first.prompt_ids) - 1:-1].argmax(-1).tolist() == list(first.continuation_ids)  # greedy
    assert sorted(checkpoint.batches) == [0, 2]

    def no_decoding(*args, **kwargs):
        raise AssertionError("a batch the checkpoint holds was decoded again")

    monkeypatch.setattr(stages, "decode", no_decoding)
    done.clear()
    again = stages.generate_corpus(loaded, prompts, options, lambda stage, amount: done.append(amount),
                                   CalibrationCheckpoint({"name": "tiny"}, options))
    assert again == texts and sum(done) == 3 * 18  # the progress bar still reaches its end


def test_the_layer_profile_needs_replies_longer_than_late_from():
    short = [ScoringText("builtin/0", (1, 2), tuple(range(100, 116)))]  # 16 tokens: none longer than LATE_FROM
    with pytest.raises(UserError) as raised:
        stages.measure_layer_profile(None, short, lambda stage, amount: None)
    assert str(raised.value) == "the model's replies are all shorter than 17 tokens: nothing to calibrate on"


def test_bridges_are_fitted_on_the_reply_positions_hidden_states(tiny_models):
    model = tiny_models["llama"]
    texts = [ScoringText("a", (1, 4093, 314, 260), tuple(range(500, 512))), ScoringText("b", (1, 33),
                                                                                          tuple(range(600, 606)))]
    runs = [(3, 3), (2, 4)]
    done = []
    bridges, tokens = stages.fit_bridges(model, texts, runs, CalibrationOptions(ridge=0.1),
                                         lambda stage, amount: done.append((stage, amount)))
    assert tokens == (12 - 1) + (6 - 1) and done == [("bridges", 1), ("bridges", 1)]  # reply positions from 1 on
    states = []
    for text in texts:
        ids = torch.tensor([[*text.prompt_ids, *text.continuation_ids[:-1]]])
        with torch.inference_mode():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # [l]: layer l's input
        states.append([layer_input[0, len(text.prompt_ids):].double() for layer_input in hidden])
    for bridge, (first, last) in zip(bridges, runs):
        inputs = torch.cat([text_states[first] for text_states in states])
        change = torch.cat([text_states[last + 1] for text_states in states]) - inputs
        gram = inputs.T @ inputs
        expected = torch.linalg.solve(gram + 0.1 * float(gram.diagonal().mean()) * torch.eye(64), inputs.T @ change)
        assert (bridge.first, bridge.last) == (first, last)
        assert torch.allclose(bridge.weight.double(), expected, atol=1e-3, rtol=1e-3)
