"""render/evaluation.py: bench, lm-eval, profile-ppl and calibration results as a person reads them (every number
also in --json)."""

from __future__ import annotations

import io

from rich.console import Console

from d3cli.cli import render

FULL = {"method": "full", "label": "full depth", "accuracy": 0.5, "accuracy_flexible": 0.625, "delta_points": 0.0,
        "agreement": 1.0, "repetition": 0.01, "loops": 0, "examples": 8, "mean_layers": 8.0, "generated_tokens": 800,
        "tokens_per_s": 20.04, "measured_speedup": 1.0, "decode_speedup": 1.0}
D3 = {"method": "d3", "label": "d3 α=0.9", "accuracy": 0.375, "accuracy_flexible": 0.5, "delta_points": -12.5,
      "agreement": 0.75, "repetition": None, "loops": 2, "examples": 8, "mean_layers": 5.26, "generated_tokens": 812,
      "tokens_per_s": 27.3, "measured_speedup": 1.3623, "decode_speedup": None}
SUMMARY = {"task": "gsm8k", "model": "tiny", "examples": 8, "methods": [FULL, D3], "schedule_source": "option",
           "output": "d3-bench-gsm8k-tiny.jsonl"}
SCHEDULE = {"step_costs": {"num_layers": 8}, "noise": None,
            "fidelity": {"delta_nll": 0.0812, "delta_repetition": -0.01}, "budget": {"nll": 0.1}, "alpha": 0.9,
            "min_layers": 3, "predicted_speedup": 1.456}


def shown(draw, *args) -> str:
    console = Console(file=io.StringIO(), width=100, force_terminal=False)
    draw(console, *args)
    return console.file.getvalue()


def cells(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


def test_the_bench_table_of_an_answer_task():
    text = shown(render.print_bench_table, SUMMARY)
    rows = cells(text)
    assert rows[0] == ["d3", "bench", "·", "gsm8k", "·", "tiny", "·", "8", "examples"]
    assert rows[1] == ["method", "strict", "flex", "Δpts", "agree", "rep", "loops", "layers", "tokens", "tok/s",
                       "speedup", "decode"]
    assert rows[2] == ["full", "depth", "50.0%", "62.5%", "+0.0", "100.0%", "1.0%", "0/8", "8.0", "800", "20.0",
                       "1.00×", "1.00×"]
    assert rows[3] == ["d3", "α=0.9", "37.5%", "50.0%", "-12.5", "75.0%", "2/8", "5.3", "812", "27.3", "1.36×"]
    assert "strict, flex: accuracy by the two answer extractors" in text
    assert text.splitlines()[-2:] == ["the d3 schedule: chosen by --alpha and --min-layers",
                                      "per-example results: d3-bench-gsm8k-tiny.jsonl"]


def test_the_bench_table_of_free_replies_shows_fidelity_instead_of_accuracy():
    methods = [{**FULL, "accuracy": 0.25, "repetition": 0.02, "delta_repetition": 0.0, "delta_nll": 0.0,
                "median_first_difference": None},
               {**D3, "accuracy": 0.25, "repetition": 0.1, "delta_repetition": 0.08, "delta_nll": 0.3456,
                "median_first_difference": 17}]
    text = shown(render.print_bench_table, {**SUMMARY, "task": "replies", "methods": methods,
                                            "schedule_source": "default", "calibration": None})
    rows = cells(text)
    assert rows[1] == ["method", "answers", "rep", "Δrep", "loops", "ΔNLL", "leaves", "layers", "speedup"]
    assert rows[2] == ["full", "depth", "25.0%", "0.02", "+0.00", "0/8", "+0.00", "–", "8.0", "1.00×"]
    assert rows[3] == ["d3", "α=0.9", "25.0%", "0.10", "+0.08", "2/8", "+0.35", "17", "5.3", "1.36×"]
    assert "ΔNLL: the full-depth model's NLL per token" in " ".join(text.split())
    assert "the d3 schedule: d3's default (the model is not calibrated: d3 calibrate chooses one)" in text


def test_a_bench_of_full_depth_alone_says_why():
    text = " ".join(shown(render.print_bench_table, {**SUMMARY, "methods": [FULL],
                                                      "schedule_source": "calibration"}).split())
    assert ("only full depth ran: the d3 schedule is full depth (α 1, the model's calibration found none within its "
            "budget); --alpha 0.98 compares D3 with it") in text


def test_the_lm_eval_table_has_a_column_per_method_with_the_change_from_full_depth():
    summary = {"model": "tiny", "documents": {"gsm8k": 5}, "tasks": ["gsm8k"], "output": "lm-eval.json", "methods": [
        {"method": "full", "label": "full depth", "metrics": {"gsm8k": {"exact_match,strict": 0.4,
                                                                       "exact_match,flex": 0.6}},
         "delta": None, "agreement": None, "mean_layers": 8.0, "tokens": 300, "seconds": 12.34, "time_ratio": 1.0},
        {"method": "d3", "label": "d3", "metrics": {"gsm8k": {"exact_match,strict": 0.2}},
         "delta": {"gsm8k": {"exact_match,strict": -0.2}}, "agreement": {"gsm8k": 0.8}, "mean_layers": 5.5,
         "tokens": 310, "seconds": 9.0, "time_ratio": 1.3711}]}
    rows = cells(shown(render.print_lm_eval_table, summary))
    assert rows[0] == ["d3", "bench", "·", "tiny", "·", "lm-eval", "documents:", "gsm8k", "5"]
    assert rows[2:9] == [
        ["gsm8k", "·", "exact_match,strict", "0.400", "0.200", "(-0.200)"],
        ["gsm8k", "·", "exact_match,flex", "0.600", "–"],  # d3 has no such metric
        ["agreement", "80.0%"],
        ["mean", "layers", "8.0", "5.5"],
        ["tokens", "300", "310"],
        ["time", "12.3", "s", "9.0", "s"],
        ["speedup", "1.00×", "1.37×"],
    ]
    assert rows[-1] == ["summary:", "lm-eval.json"]


PROFILE = {"corpus": "wikitext", "model": "tiny", "calibration": None, "bridges": False, "profile": {
    "texts": 3, "tokens": 120, "mean_nll": 2.5,
    "buckets": [{"first": 0, "last": 0, "count": 3, "mean_nll": 3.0, "perplexity": 20.09, "perplexity_low": 15.0,
                 "perplexity_high": 26.5, "fit": 19.0},
                {"first": 1, "last": 3, "count": 9, "mean_nll": 2.0, "perplexity": 7.389, "perplexity_low": 6.0,
                 "perplexity_high": 9.1, "fit": None}],
    "fit": {"c": 5.0, "a": 15.0, "b": 0.75, "r2": 0.9876, "rmse": 0.1234, "points": 4},
    "d3": [{"label": "α=0.9", "skip_order": "middle", "bridges": True, "mean_layers": 5.5, "mean_nll": 2.75,
            "nll_increase": 0.25, "top1_agreement": 0.875, "buckets": [{"nll_increase": 0.0},
                                                                        {"nll_increase": 0.3333}]}]}}


def test_the_perplexity_profile_a_row_per_position_bucket_with_its_fit():
    text = shown(render.print_ppl_profile, PROFILE)
    lines = text.splitlines()
    assert lines[0].split() == ["d3", "profile-ppl", "·", "wikitext", "·", "tiny", "·", "3", "texts,", "120", "tokens"]
    assert lines[1].split() == ["positions", "tokens", "NLL", "ppl", "95%", "CI", "ppl", "┃", "fit", "Δα=0.9"]
    assert lines[2].split() == ["0–0", "3", "3.000", "20.09", "15.00–26.50", "██████████┃█", "+0.000"]
    assert lines[3].split() == ["1–3", "9", "2.000", "7.39", "6.00–9.10", "████", "+0.333"]
    assert lines[4] == "fit: ppl(i) ≈ 5.000 + 15.000·(i+1)^(−0.750)   R² 0.988, RMSE 0.123 over 4 positions"
    assert lines[5] == "calibration: none for this model (d3 calibrate fits its layer order and bridges)"
    assert " ".join(" ".join(lines[6:]).split()) == (
        "α=0.9 (middle, bridged): mean 5.50 layers, NLL 2.7500 (+0.2500 nats over full depth 2.5000), same top token "
        "as full depth at 87.5% of positions")


def test_a_profile_without_a_fit_says_so_and_names_its_calibration():
    result = {**PROFILE, "calibration": "c.safetensors", "bridges": True,
              "profile": {**PROFILE["profile"], "fit": None, "d3": []}}
    lines = shown(render.print_ppl_profile, result).splitlines()
    assert lines[-2:] == ["fit: too few positions with two or more tokens for a power-law fit",
                          "calibration: c.safetensors, bridges on"]


def test_the_layer_profile_marks_core_layers_and_the_drop_order():
    result = {"late_from": 16, "layers": [
        {"layer": 0, "core": True, "block_influence": 0.5, "nll_increase": 1.25, "importance_rank": None},
        {"layer": 1, "core": False, "block_influence": 0.05, "nll_increase": -0.01, "importance_rank": 0},
        {"layer": 2, "core": False, "block_influence": 0.1, "nll_increase": 0.2, "importance_rank": 1}]}
    rows = cells(shown(render.print_layer_profile, result))
    assert rows[0] == ["layer", "profile", "·", "late", "positions", "≥", "16"]
    assert rows[2] == ["0", "core", "0.5000", "█" * 16, "+1.2500", "█" * 16]  # the largest fills the bar; no rank
    assert rows[3] == ["1", "flex", "0.0500", "██", "-0.0100", "0"]  # a gain draws no bar
    assert rows[4] == ["2", "flex", "0.1000", "███", "+0.2000", "███", "1"]


def test_the_recommendation_marks_its_candidate_and_checks_it():
    calibration = {
        "step_costs": {"t_fixed_ms": 1.234, "t_layer_ms": 0.5678, "r2": 0.9991}, "target": "0.05 nats",
        "reply_tokens": 64,
        "candidates": [{"alpha": 0.98, "min_layers": 6, "predicted_layer_ratio": 0.9, "predicted_speedup": 1.1,
                        "predicted_nll_increase": 0.01},
                       {"alpha": 0.95, "min_layers": 4, "predicted_layer_ratio": 0.7, "predicted_speedup": 1.35,
                        "predicted_nll_increase": 0.04}],
        "recommended": {"alpha": 0.95, "min_layers": 4, "predicted_speedup": 1.35, "predicted_nll_increase": 0.04},
        "check": {"measured_speedup": 1.3, "measured_nll_increase": 0.045, "texts": 5}}
    text = shown(render.print_calibration, calibration)
    rows = cells(text)
    assert text.splitlines()[0] == "step cost on this machine: T(k) ≈ 1.23 ms + k × 0.568 ms (R² 0.999)"
    assert rows[3] == ["0.9800", "6", "0.900", "1.100×", "+0.0100"]
    assert rows[4] == ["0.9500", "4", "0.700", "1.350×", "+0.0400", "←", "recommended"]
    assert " ".join(text.split()).endswith(
        "recommended: --alpha 0.9500 --min-layers 4 decode speedup predicted 1.350×, measured 1.300×; ΔNLL predicted "
        "+0.0400, measured +0.0450 nats (5 held-out texts)")


def test_the_calibrated_schedule_in_one_line():
    assert render.calibrated_schedule_text(SCHEDULE) == (
        "α 0.9, floor 3 of 8 · predicted 1.46× · replies +0.081 nats/token, repetition -0.010 (budget 0.1)")
    assert render.calibrated_schedule_text({**SCHEDULE, "step_costs": {}}).startswith("α 0.9, floor 3 · predicted")
    assert render.calibrated_schedule_text({**SCHEDULE, "fidelity": None,
                                            "noise": {"prompts": 8, "identical": 6, "loops": 1}}) == (
        "full depth: no candidate's replies stayed within 0.1 nats/token of full depth's without looping · full depth "
        "itself, decoded alone instead of batched: 2 of 8 replies change, 1 loop(s)")


def test_what_calibrate_made():
    record = {"model": "tiny", "calibration": "/cache/tiny.safetensors", "texts": 4, "tokens": 96,
              "drop_order": [3, 4, 2, 5], "bridged_runs": [[3, 3], [3, 4]], "bridge_bytes": 3 * 2**20, "rank": 16,
              "seconds": {"corpus": 12.3, "profile": 4.0}, "schedule": None, "time_limit_cost": "64 → 32 prompts"}
    rows = [line.strip("│ ") for line in shown(render.print_calibration_made, record).splitlines()]
    assert "d3 calibrate · tiny" in rows[0]
    assert rows[1:-1] == ["written to  /cache/tiny.safetensors",
                          "corpus      4 replies, 96 tokens",
                          "skip order  importance: 3 4 2 5",
                          "bridges     2 runs (3, 3–4), 3.0 MiB, rank 16",
                          "time        corpus 12 s, profile 4 s",
                          "time limit  64 → 32 prompts"]
    with_schedule = shown(render.print_calibration_made, {**record, "rank": None, "schedule": SCHEDULE})
    assert "bridges     2 runs (3, 3–4), 3.0 MiB " in with_schedule  # full rank: no rank said
    assert "schedule    α 0.9, floor 3 of 8 · predicted 1.46×" in with_schedule
