"""`d3 bench --task lm-eval:TASK` (evaluation/harness/bench.py): lm-eval's tasks at full depth, with D3 and with a
matched baseline side by side; the task names read from --task, and the rows made of lm-eval's output."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

from d3cli.base.errors import UserError  # noqa: E402
from d3cli.evaluation.bench.methods import MethodRun  # noqa: E402
from d3cli.evaluation.harness.bench import _add_deltas, _answer, _row, parse_task  # noqa: E402

TINY_SCHEDULE = ["--alpha", "0.8", "--min-layers", "3", "--head", "1", "--tail", "1"]


def test_bench_runs_lm_eval_tasks_side_by_side(cli, tiny_model_dir, shared_data, tmp_path):
    output = tmp_path / "summary.json"
    result = cli(["bench", "--task", "lm-eval:gsm8k_cot,bbh_mc_navigate", "--model", str(tiny_model_dir),
                  "--data-dir", str(shared_data), "--limit", "3", "-n", "12", *TINY_SCHEDULE,
                  "--methods", "d3,static", "--json", "-o", str(output)])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == json.loads(output.read_text()) | {"output": str(output)}
    assert summary["documents"] == {"gsm8k_cot": 3, "bbh_mc_navigate": 3}
    rows = {row["name"]: row for row in summary["methods"]}
    assert list(rows) == ["full", "d3", "static"]
    assert set(rows["full"]["metrics"]["gsm8k_cot"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert set(rows["full"]["metrics"]["bbh_mc_navigate"]) == {"acc,none"}
    assert rows["full"]["mean_layers"] == 8 and rows["d3"]["mean_layers"] < 8
    assert abs(rows["static"]["mean_layers"] - rows["d3"]["mean_layers"]) < 1  # matched to D3's mean depth
    assert rows["full"]["agreement"] == {"gsm8k_cot": 1.0, "bbh_mc_navigate": 1.0}
    assert rows["d3"]["delta"]["bbh_mc_navigate"]["acc,none"] == pytest.approx(
        rows["d3"]["metrics"]["bbh_mc_navigate"]["acc,none"] - rows["full"]["metrics"]["bbh_mc_navigate"]["acc,none"])
    assert "task · metric" in result.stderr  # the table goes to stderr with --json


def test_task_names_come_from_the_task_option():
    assert parse_task("lm-eval:gsm8k_cot, bbh_mc_navigate,") == ("gsm8k_cot", "bbh_mc_navigate")
    for empty in ("lm-eval:", "lm-eval: , "):
        with pytest.raises(UserError) as raised:
            parse_task(empty)
        assert str(raised.value) == "--task lm-eval: needs task names, like --task lm-eval:gsm8k_cot"


def test_rows_hold_lm_evals_metrics_their_change_from_full_depth_and_agreement_with_it():
    assert _answer("multiple_choice", [("-1.5", False), ("-0.5", True), ("-2.0", False)]) == 1  # the likeliest
    assert _answer("generate_until", ["18"]) == ["18"] and _answer("loglikelihood_rolling", [-3.2]) is None
    full_samples = {"gsm8k_cot": {0: ["18"], 1: ["3"], 2: ["[invalid]"]}, "rolling": {0: None}}
    full_output = {"results": {"gsm8k_cot": {"alias": "gsm8k_cot", "exact_match,strict-match": 0.5,
                                             "exact_match_stderr,strict-match": 0.1,
                                             "exact_match,flexible-extract": 0.75},
                               "rolling": {"bits_per_byte,none": 1.25}}}
    d3_output = {"results": {"gsm8k_cot": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.75},
                             "rolling": {"bits_per_byte,none": 1.5}}}
    d3_samples = {"gsm8k_cot": {0: ["18"], 1: ["4"], 2: ["[invalid]"]}, "rolling": {0: None}}
    full = _row(MethodRun("full", None), full_output, full_samples, full_samples,
                [{"tokens": 3, "layers": [8, 8, 8]}], 10.0, 8)
    d3 = _row(MethodRun("d3", 0.9), d3_output, d3_samples, full_samples,
              [{"tokens": 4, "layers": [8, 6, 5, 4]}, {"tokens": 2, "layers": [8, 6]}], 4.0, 8)
    _add_deltas([full, d3])
    assert full["metrics"] == {"gsm8k_cot": {"exact_match,strict-match": 0.5, "exact_match,flexible-extract": 0.75},
                               "rolling": {"bits_per_byte,none": 1.25}}  # no alias, no standard error
    assert full["agreement"] == {"gsm8k_cot": 1.0, "rolling": None}  # a score alone has no answer to agree on
    assert d3["agreement"] == {"gsm8k_cot": 0.6667, "rolling": None}
    assert (d3["name"], d3["label"], d3["documents"]) == ("d3", "d3 α=0.9", {"gsm8k_cot": 3, "rolling": 1})
    assert (d3["tokens"], d3["mean_layers"], d3["layer_ratio"]) == (6, 6.167, 0.7708)
    assert d3["delta"] == {"gsm8k_cot": {"exact_match,strict-match": -0.25, "exact_match,flexible-extract": 0.0},
                           "rolling": {"bits_per_byte,none": 0.25}}
    assert (d3["time_ratio"], full["time_ratio"]) == (2.5, 1.0)
    alone = _row(MethodRun("d3", 0.9), d3_output, d3_samples, None, [], 4.0, 8)
    _add_deltas([alone])
    assert alone["agreement"] is None and alone["delta"] is None and alone["time_ratio"] is None
    assert (alone["tokens"], alone["mean_layers"]) == (0, 0.0)
