import pytest

from d3cli.core.decode.results import Reply, estimated_speedup, layer_ratio, session_totals


def test_session_totals_weight_each_reply_by_its_tokens():
    records = [{"generated_tokens": 2, "layers_per_token": [30, 20], "time_s": 1.0},
               {"generated_tokens": 4, "layers_per_token": [30, 20, 20, 20], "time_s": 0.5}]
    totals = session_totals(records, 30)
    assert totals["turns"] == 2 and totals["generated_tokens"] == 6
    assert totals["mean_layers"] == pytest.approx(140 / 6)  # not the mean of the two replies' means (25, 22.5)
    assert totals["layer_ratio"] == pytest.approx(140 / 6 / 30)
    assert totals["estimated_speedup"] == pytest.approx(30 / (140 / 6))
    assert totals["tokens_per_s"] == pytest.approx(6 / 1.5)
    assert session_totals([], 30) is None


def test_one_reply_and_a_session_of_it_agree():
    reply = Reply(token_ids=[1, 2, 3], text="abc", layers_per_token=[30, 25, 20], time_s=0.3)
    totals = session_totals([{"generated_tokens": 3, "layers_per_token": [30, 25, 20], "time_s": 0.3}], 30)
    assert (totals["layer_ratio"], totals["estimated_speedup"]) == pytest.approx(
        (layer_ratio(reply, 30), estimated_speedup(reply, 30)))


def test_decode_and_prefill_rates_are_apart_from_the_whole_replys():
    from d3cli.core.decode.results import Reply

    reply = Reply(token_ids=[1, 2, 3, 4, 5], time_s=3.0, first_token_s=2.0)  # a long prefill, 4 quick steps
    assert reply.tokens_per_s == pytest.approx(5 / 3)
    assert reply.decode_tokens_per_s == pytest.approx(4 / 1.0)
    assert reply.prefill_tokens_per_s(600) == pytest.approx(300)
    assert Reply(token_ids=[1], time_s=1.0, first_token_s=1.0).decode_tokens_per_s is None


def test_a_records_prefill_rate_counts_only_the_tokens_prefilled():
    from d3cli.core.decode.results import reply_record
    from d3cli.core.session.plan import plan_of
    from d3cli.core.session.settings import DecodeSettings

    reply = Reply(token_ids=[1, 2], layers_per_token=[8, 8], time_s=1.5, first_token_s=1.0)
    plan = plan_of(DecodeSettings(), 8)
    fresh, cached = reply_record(reply, plan, "m", 600), reply_record(reply, plan, "m", 600, cached_tokens=500)
    assert (fresh["cached_prompt_tokens"], fresh["prefill_tokens_per_s"]) == (0, 600)
    assert (cached["prompt_tokens"], cached["cached_prompt_tokens"], cached["prefill_tokens_per_s"]) == (600, 500, 100)
