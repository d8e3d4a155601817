"""The lm-eval model `d3` (evaluation/harness/model.py) against lm-eval's interface and against d3's own engine."""

from __future__ import annotations

import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from d3cli.core.decode import engine  # noqa: E402
from d3cli.core.decode.schedule import DecaySchedule  # noqa: E402
from d3cli.core.model.loader import LoadedModel  # noqa: E402
from d3cli.core.session.plan import plan_for  # noqa: E402
from d3cli.core.session.settings import DecodeSettings  # noqa: E402
from d3cli.evaluation.harness.model import D3LM  # noqa: E402
from d3cli.evaluation.scoring import ScoringText, teacher_forced_nll  # noqa: E402

CONTEXTS = ["The capital of France is", "Two plus two equals", "Once upon a time, in a small village,"]
CONTINUATIONS = [" Paris, a city of light and museums.", " four, as everyone knows.", " there lived a baker."]


@pytest.fixture
def loaded(tiny_models, tokenizer):
    return LoadedModel(tiny_models["llama"], tokenizer, "tiny")


def decayed(loaded) -> DecaySchedule:
    return DecaySchedule.build(8, alpha=0.8, min_layers=3, head=1, tail=1, skip_order="middle")


def plan_with(loaded, schedule: DecaySchedule):
    """A plan of this model with `schedule` (what d3 bench hands the lm-eval model for a baseline)."""
    return plan_for(loaded, DecodeSettings()).with_schedule(schedule)


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=index) for index, args in enumerate(arguments)]


def full_depth_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's own recipe with one plain forward: encode context+continuation, split, log-softmax."""
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    continuation_ids = whole[len(context_ids):]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].float()
    log_probs = torch.log_softmax(logits, -1)[len(context_ids) - 1:]
    targets = torch.tensor(continuation_ids)
    return float(log_probs.gather(-1, targets[:, None]).sum()), bool(torch.equal(log_probs.argmax(-1), targets))


def test_at_alpha_one_a_loglikelihood_is_the_full_depth_forward(loaded):
    lm = D3LM(loaded=loaded, alpha=1.0)
    answers = lm.loglikelihood(requests("loglikelihood", list(zip(CONTEXTS, CONTINUATIONS))), disable_tqdm=True)
    for (logprob, greedy), context, continuation in zip(answers, CONTEXTS, CONTINUATIONS):
        expected, expected_greedy = full_depth_logprob(loaded.model, loaded.tokenizer, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-3) and greedy == expected_greedy


def test_under_d3_a_loglikelihood_is_what_cached_decoding_computes(loaded):
    """The continuation scored under the schedule equals forcing it through the real cached engine step by step."""
    schedule = decayed(loaded)
    lm = D3LM(loaded=loaded, plan=plan_with(loaded, schedule))
    answers = lm.loglikelihood(requests("loglikelihood", list(zip(CONTEXTS, CONTINUATIONS))), disable_tqdm=True)
    full = D3LM(loaded=loaded, alpha=1.0).loglikelihood(
        requests("loglikelihood", list(zip(CONTEXTS, CONTINUATIONS))), disable_tqdm=True)
    for (logprob, _), (full_logprob, _), context, continuation in zip(answers, full, CONTEXTS, CONTINUATIONS):
        context_ids, continuation_ids = lm._encode_pair(context, continuation)
        text = ScoringText("x", tuple(context_ids), tuple(continuation_ids))
        assert logprob == pytest.approx(-float(teacher_forced_nll(loaded.model, text, schedule).sum()), abs=1e-3)
        assert not math.isclose(logprob, full_logprob, abs_tol=1e-3)  # the schedule skipped layers: it shows
    for record in lm.records:  # what d3 bench reads for depth: each scored token at its step's depth
        assert record["layers"] == [schedule.layers_at(step) for step in range(record["tokens"])]
    assert min(lm.records[0]["layers"]) < 8


def test_requests_sharing_a_context_give_what_they_give_alone(loaded):
    """Multiple choice reuses a context's prefill across its answers; each answer must score as if alone."""
    lm = D3LM(loaded=loaded, plan=plan_with(loaded, decayed(loaded)))
    choices = [(CONTEXTS[0], " Paris."), (CONTEXTS[0], " Lyon."), (CONTEXTS[1], " four."), (CONTEXTS[0], " Nice.")]
    together = lm.loglikelihood(requests("loglikelihood", choices), disable_tqdm=True)
    alone = [lm.loglikelihood(requests("loglikelihood", [choice]), disable_tqdm=True)[0] for choice in choices]
    assert [value for value, _ in together] == pytest.approx([value for value, _ in alone], abs=1e-4)


def test_rolling_loglikelihood_sums_every_token_once_and_equals_full_depth_at_alpha_one(loaded):
    document = " ".join(CONTINUATIONS * 3)
    lm = D3LM(loaded=loaded, alpha=1.0)
    (total,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(document,)]), disable_tqdm=True)
    ids = [lm.prefix_token_id, *loaded.tokenizer.encode(document, add_special_tokens=False)]
    with torch.no_grad():
        log_probs = torch.log_softmax(loaded.model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
    assert total == pytest.approx(float(log_probs.gather(-1, torch.tensor(ids[1:])[:, None]).sum()), abs=1e-3)
    windowed = D3LM(loaded=loaded, alpha=1.0, max_length=16)  # several windows: each token still scored once
    (by_windows,) = windowed.loglikelihood_rolling(requests("loglikelihood_rolling", [(document,)]), disable_tqdm=True)
    assert sum(record["tokens"] for record in windowed.records) == len(ids) - 1
    assert by_windows < 0 and by_windows != pytest.approx(total, abs=1e-3)  # less context per token


def test_generate_until_is_d3_decoding_cut_at_the_stop_strings(loaded):
    schedule = decayed(loaded)
    lm = D3LM(loaded=loaded, plan=plan_with(loaded, schedule), batch_size=2)
    gen_kwargs = {"until": ["\n\n", "Question:"], "max_gen_toks": 12, "do_sample": False}
    texts = lm.generate_until(requests("generate_until", [(context, gen_kwargs) for context in CONTEXTS]),
                              disable_tqdm=True)
    plan = plan_with(loaded, schedule).with_settings(max_new_tokens=12)
    for text, context, record in zip(texts, CONTEXTS, lm.records):
        prompt = loaded.tokenizer.encode(context, add_special_tokens=False)
        (reply,) = engine.decode(loaded, [prompt], plan, stop=["\n\n", "Question:", "<|im_end|>"])
        assert text == reply.text.split("\n\n")[0].split("Question:")[0]
        assert record["layers"] == [schedule.layers_at(step) for step in range(record["tokens"])]
    short = lm.generate_until(requests("generate_until", [(CONTEXTS[0], {"until": [], "max_gen_toks": 3})]),
                              disable_tqdm=True)
    assert lm.records[-1]["tokens"] <= 3 and isinstance(short[0], str)


def test_model_arguments_are_d3_generate_options_checked_the_same_way(loaded):
    assert D3LM(loaded=loaded, alpha=0.9, min_layers="6", skip_order="late").schedule.min_layers == 6
    from d3cli.base.errors import UserError

    with pytest.raises(UserError, match="alpha must lie in"):
        D3LM(loaded=loaded, alpha=1.5)
    with pytest.raises(UserError, match="takes no argument temperatur"):
        D3LM(loaded=loaded, temperatur=0.5)


def test_the_weights_model_argument_loads_and_scores_the_quantized_weights(tiny_model_dir):
    lm = D3LM(pretrained=str(tiny_model_dir), weights="int8", alpha=1.0)
    assert lm.loaded.weights.kind == "int8" and lm.loaded.weights.modules.get("int8")
    [(logprob, greedy)] = lm.loglikelihood(requests("loglikelihood", [(CONTEXTS[0], CONTINUATIONS[0])]),
                                           disable_tqdm=True)
    expected, expected_greedy = full_depth_logprob(lm.loaded.model, lm.tokenizer, CONTEXTS[0], CONTINUATIONS[0])
    assert math.isclose(logprob, expected, rel_tol=1e-4, abs_tol=1e-4) and greedy == expected_greedy
    from d3cli.base.errors import UserError

    with pytest.raises(UserError, match="unknown weights .int3."):
        D3LM(pretrained=str(tiny_model_dir), weights="int3")
    with pytest.raises(UserError, match="group_size"):
        D3LM(pretrained=str(tiny_model_dir), weights="int4", group_size="many")


def test_lm_eval_finds_the_model_by_name():
    from lm_eval.api.registry import get_model

    assert get_model("d3") is D3LM
