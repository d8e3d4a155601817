"""A bench run's summary (evaluation/bench/summary.py): accuracy, agreement, depth and speed per method from its
records alone, free-running fidelity against full depth, and accuracy per BBH subtask."""

from __future__ import annotations

import pytest

from d3cli.evaluation.bench.methods import MethodRun
from d3cli.evaluation.bench.results_file import prompt_digest
from d3cli.evaluation.bench.summary import by_subtask, fidelity_columns, summarize
from d3cli.evaluation.tasks.base import Example


def record(method, example_id, correct, flexible, tokens=10, layers=30, seconds=1.0, batch=None, prefill=0.1):
    return {"type": "example", "method": method, "id": example_id, "prompt_sha256": _digest(example_id),
            "correct": correct, "correct_flexible": correct, "flexible": flexible, "tokens": tokens,
            "layers": [layers] * tokens, "seconds": seconds, "first_token_seconds": prefill,
            "batch": batch or f"{method}/{example_id}"}


def _digest(example_id):
    return prompt_digest(Example(example_id, f"prompt {example_id}", "1"))


def test_summary_accuracy_agreement_delta_and_speed():
    examples = [Example(f"e{i}", f"prompt e{i}", "1") for i in range(4)]
    runs = [MethodRun("full", None), MethodRun("d3", 0.9)]
    records = [record("full", f"e{i}", i < 2, str(i), seconds=2.0) for i in range(4)]
    records += [record("d3@0.9", "e0", True, "0", layers=20, seconds=1.0, batch="b"),
                record("d3@0.9", "e1", False, "9", layers=20, seconds=1.5, batch="b"),  # one batch: 1.5 s wall
                record("d3@0.9", "e2", False, "2", layers=20, seconds=1.0),
                record("d3@0.9", "e3", True, "3", layers=20, seconds=1.0)]
    full, d3 = summarize(records, runs, examples, num_layers=30)
    assert (full["accuracy"], full["agreement"], full["measured_speedup"]) == (0.5, 1.0, 1.0)
    assert (d3["accuracy"], d3["delta_points"], d3["agreement"]) == (0.5, 0.0, 0.75)
    assert d3["mean_layers"] == 20 and d3["layer_ratio"] == pytest.approx(0.6667, abs=1e-4)
    assert d3["tokens_per_s"] == pytest.approx(40 / 3.5, abs=1e-3) and full["tokens_per_s"] == 5.0
    assert d3["measured_speedup"] == pytest.approx(40 / 3.5 / 5.0, abs=1e-3)
    # without the prefills: full decodes 36 tokens in 4 x (2.0 - 0.1) s; d3 decodes 36 in 3.5 - 3 x 0.1 s
    assert full["decode_tokens_per_s"] == pytest.approx(36 / 7.6, abs=1e-3)
    assert d3["decode_tokens_per_s"] == pytest.approx(36 / 3.2, abs=1e-3)
    assert d3["decode_speedup"] == pytest.approx((36 / 3.2) / (36 / 7.6), abs=1e-2)


def test_only_records_of_these_prompts_count_and_a_run_without_any_has_no_row():
    examples = [Example("e0", "prompt e0", "1"), Example("e1", "prompt e1", "1")]
    runs = [MethodRun("full", None), MethodRun("d3", 0.9), MethodRun("static", 0.9)]
    stale = {**record("d3@0.9", "e1", False, "7", layers=10), "prompt_sha256": "another prompt"}  # --limit changed
    (d3,) = summarize([record("d3@0.9", "e0", True, "1", layers=20), stale], runs, examples, num_layers=30)
    assert (d3["name"], d3["label"], d3["examples"], d3["mean_layers"], d3["accuracy"]) == ("d3", "d3 α=0.9", 1, 20,
                                                                                             1.0)
    assert d3["agreement"] is None and d3["delta_points"] is None and d3["measured_speedup"] is None  # no full row


def test_fidelity_columns_compare_each_reply_with_full_depths():
    full = {"a": {"repetition": 0.1, "token_ids": [1, 2, 9, 4], "nll_full_depth": 2.0},
            "b": {"repetition": 0.0, "token_ids": [5, 6, 7], "nll_full_depth": 1.0},
            "c": {"repetition": 0.3, "token_ids": [8, 8]},
            "d": {"repetition": 0.0}}
    done = {"a": {"repetition": 0.2, "token_ids": [1, 3, 3, 4], "nll_full_depth": 2.5},  # loops: +0.1 > 0.05
            "b": {"repetition": 0.0, "token_ids": [5, 6, 7]},  # identical, not scored
            "c": {"repetition": 0.34, "token_ids": [8, 8, 8, 8]},  # full depth's is a prefix: differs at 2
            "d": {"repetition": 0.0}}  # no tokens: only its repetition counts
    columns = fidelity_columns(done, full, ["a", "b", "c", "d"])
    assert columns == {"repetition": 0.135, "delta_repetition": 0.0467, "worst_delta_repetition": 0.1, "loops": 1,
                       "identical": 1, "median_first_difference": 2, "delta_nll": 0.5}  # differences at 1 and 2
    assert fidelity_columns({"d": done["d"]}, {"d": full["d"]}, ["d"]) == {"repetition": 0.0}
    assert fidelity_columns({"x": {}}, {}, []) == {"repetition": None}


def test_by_subtask_is_flexible_accuracy_per_method_and_subtask():
    examples = [Example("n0", "", "", subtask="navigate"), Example("n1", "", "", subtask="navigate"),
                Example("w0", "", "", subtask="word_sorting"), Example("g0", "", "")]
    records = [{"method": "full", "id": "n0", "correct_flexible": True},
               {"method": "full", "id": "n1", "correct_flexible": False},
               {"method": "full", "id": "w0", "correct_flexible": True},
               {"method": "d3@0.9", "id": "n1", "correct_flexible": True},
               {"method": "full", "id": "g0", "correct_flexible": True}]  # no subtask: left out
    assert by_subtask(records, examples) == {"full": {"navigate": 0.5, "word_sorting": 1.0},
                                             "d3@0.9": {"navigate": 1.0}}
