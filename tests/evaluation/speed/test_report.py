"""`d3 bench --task speed`'s report (evaluation/speed/report.py): complete and consistent (no timing thresholds here),
the quick form, the first-token children's options, and a weight kind that does not fit skipped with its reason."""

from __future__ import annotations

import json

import pytest

from d3cli.core.decode.schedule import DecaySchedule
from d3cli.evaluation.speed.steps import mean_decode_layers
from d3cli.evaluation.timing import fit_line

TINY = ["--min-layers", "3", "--head", "1", "--tail", "1"]


def test_speed_bench_json_is_complete_and_consistent(cli, tiny_model_dir):
    result = cli(["bench", "--task", "speed", "--model", str(tiny_model_dir), "-n", "12", "--repeats", "1",
                  "--alpha", "0.8,0.9", *TINY, "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"hf_tokens_per_s", "d3_alpha1_tokens_per_s", "alpha1_ratio", "t_fixed_ms", "t_layer_ms", "r2",
            "alphas"} <= report.keys()
    assert report["same_tokens"] is True
    assert report["alpha1_ratio"] == pytest.approx(report["d3_alpha1_tokens_per_s"] / report["hf_tokens_per_s"])
    t_fixed, t_layer, r2 = fit_line([(row["layers"], row["ms"]) for row in report["step_ms"]])
    assert (report["t_fixed_ms"], report["t_layer_ms"], report["r2"]) == pytest.approx(
        (max(t_fixed, 0.0), max(t_layer, 1e-9), r2))  # the line through its own step times
    assert [row["layers"] for row in report["step_ms"]][0] == 2 and report["step_ms"][-1]["layers"] == 8
    for row, alpha in zip(report["alphas"], (0.8, 0.9)):
        schedule = DecaySchedule.build(8, alpha=alpha, min_layers=3, head=1, tail=1)
        assert row["alpha"] == alpha and row["mean_layers"] == pytest.approx(mean_decode_layers(schedule, 12))
        assert row["ideal_speedup"] > 1 and row["measured_speedup"] > 0
        assert row["efficiency"] == pytest.approx(row["measured_speedup"] / row["ideal_speedup"])
    assert [row["batch_size"] for row in report["batches"]] == [1, 4, 16]
    assert all(row["full_tokens_per_s"] > 0 and row["d3_tokens_per_s"] > 0 for row in report["batches"])
    kv = report["kv_cache"]
    assert 0 < kv["d3_bytes"] < kv["full_bytes"]
    assert kv["d3_bytes"] <= kv["d3_allocated_bytes"] and kv["full_bytes"] <= kv["full_allocated_bytes"]
    first = report["first_token"]
    assert 0 < first["warm_s"] <= first["warm_exit_s"] and first["cold_s"] > 0
    assert "efficiency" in result.stderr
    assert report["weights"]["kind"] == "float32" and report["bandwidth_gb_s"] > 0
    rows = {row["name"]: row for row in report["weight_kinds"]}
    assert set(rows) == {f"d3 {kind} {label}" for kind in ("float32", "int8", "int4")
                         for label in ("full depth", "α 0.8")}
    assert rows["d3 int4 full depth"]["step_bytes"] < rows["d3 int8 full depth"]["step_bytes"] < rows[
        "d3 float32 full depth"]["step_bytes"]
    for row in rows.values():
        assert row["limit_tokens_per_s"] == pytest.approx(report["bandwidth_gb_s"] * 1e9 / row["step_bytes"])
        assert row["of_limit"] == pytest.approx(row["tokens_per_s"] / row["limit_tokens_per_s"])
        assert row["vs_llama_cpp"] is None
    assert rows["d3 int4 α 0.8"]["mean_layers"] == pytest.approx(report["alphas"][0]["mean_layers"])
    assert rows["d3 int4 α 0.8"]["step_bytes"] < rows["d3 int4 full depth"]["step_bytes"]
    assert report["llama_cpp"] == {"skipped": "the model is not a GGUF file"}
    assert {"t_fixed_ms", "t_layer_ms", "r2", "step_ms"} <= report["transformers_layers"].keys()
    assert "× llama.cpp" in result.stderr and "llama.cpp: not timed" in result.stderr


def test_the_quick_speed_bench_times_only_the_side_by_side_sections(cli, tiny_model_dir):
    result = cli(["bench", "--task", "speed", "--quick", "--model", str(tiny_model_dir), "--alpha", "0.8,0.9",
                  *TINY, "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["quick"] is True and report["tokens"] == 32 and report["repeats"] == 3
    assert [row["alpha"] for row in report["alphas"]] == [0.8]
    assert {"weight_kinds", "alpha1_ratio", "t_layer_ms"} <= report.keys()
    assert not {"batches", "kv_cache", "first_token", "transformers_layers"} & report.keys()
    assert cli(["bench", "--task", "gsm8k", "--quick"]).exit_code == 2


def test_first_token_children_load_the_model_as_the_run_did():
    from d3cli.core.model.loader import ModelOptions
    from d3cli.core.session.settings import DecodeSettings
    from d3cli.evaluation.speed.report import child_generate_args

    model_options = ModelOptions("org/model", "cpu", "float32", "auto", trust_remote_code=True)
    settings = DecodeSettings(calibration="/c.safetensors", profile=None, bridges=False)
    args = child_generate_args(model_options, settings)
    assert args == ["--model", "org/model", "--device", "cpu", "--dtype", "float32", "--device-map", "auto",
                    "--trust-remote-code", "--calibration", "/c.safetensors", "--no-bridges"]
    plain = child_generate_args(ModelOptions(device="cpu", dtype="float32"), DecodeSettings())
    assert plain == ["--device", "cpu", "--dtype", "float32"]
    import typer.main

    from d3cli.cli.app import app

    generate = typer.main.get_command(app).commands["generate"]
    parsed = generate.make_context("generate", list(args)).params  # d3 generate takes them as they are
    assert (parsed["model"], parsed["trust_remote_code"], str(parsed["calibration"]), parsed["bridges"]) == \
        ("org/model", True, "/c.safetensors", False)
    assert _value_of(parsed["device_map"]) == "auto"


def _value_of(option):
    return getattr(option, "value", option)


def test_the_speed_bench_skips_a_weight_kind_that_does_not_fit_and_says_why(cli, tiny_model_dir, monkeypatch):
    from d3cli.core.model import memory
    from d3cli.core.model.streamed import SafetensorsWeights, safetensors_files

    values = SafetensorsWeights(safetensors_files(tiny_model_dir)).numel()
    monkeypatch.setattr(memory, "available_memory", lambda: values * 2)  # int8 and int4 fit, float32 does not
    result = cli(["bench", "--task", "speed", "--quick", "--model", str(tiny_model_dir), "--alpha", "0.8", *TINY,
                  "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert list(report["skipped_weight_kinds"]) == ["float32"]
    assert "needs about" in report["skipped_weight_kinds"]["float32"]
    assert {row["weights"] for row in report["weight_kinds"]} >= {"int8", "int4"}
    assert report["load_s"] > 0 and report["peak_memory_bytes"] > 0
    assert report["long_prompt"]["d3"]["prefill_tokens_per_s"] > 0 and "skipped" in report["long_prompt"]["llama_cpp"]
