"""`d3 bench --task speed`: the benchmark runs and its numbers are consistent (no timing thresholds here)."""

from __future__ import annotations

import json

import pytest
import torch

from d3cli.core.decode.schedule import DecaySchedule
from d3cli.evaluation.speed.steps import alpha1_against_hf, kv_cache_bytes, mean_decode_layers
from d3cli.evaluation.timing import fit_line

TINY = ["--min-layers", "3", "--head", "1", "--tail", "1"]


def test_mean_decode_layers_is_the_schedules_mean_over_decode_steps():
    schedule = DecaySchedule.build(30, alpha=0.9, min_layers=24)
    assert mean_decode_layers(schedule, 11) == pytest.approx(sum(schedule.layers_at(i) for i in range(1, 11)) / 10)
    assert mean_decode_layers(DecaySchedule.build(30, alpha=1.0), 50) == 30


def test_alpha1_compares_the_same_tokens_when_the_model_would_end_at_once(tiny_models, tokenizer):
    """Both sides run past EOS without masking it: the model's `generate` must not suppress a token d3 would pick."""
    model, prompt = tiny_models["llama"], [1, 4093, 314, 260]
    with torch.inference_mode():
        first_token = int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = first_token  # the model "ends" at once
    try:
        result = alpha1_against_hf(model, tokenizer, prompt, 6, 2)
    finally:
        model.generation_config.eos_token_id = saved
    assert result["same_tokens"] is True
    assert result["alpha1_ratio"] > 0


def test_the_kv_cache_shrinks_by_the_skipped_layers_entries(tiny_models):
    schedule = DecaySchedule.build(8, alpha=0.7, min_layers=3, head=1, tail=1)
    sizes = kv_cache_bytes(tiny_models["llama"], [1, 4093, 314, 260], schedule, 20)
    per_entry = sizes["full_bytes"] / (8 * (4 + 20 - 1))  # every layer holds prompt + 19 fed tokens at full depth
    held = sum(4 + sum(1 for step in range(1, 20) if layer in schedule.kept_layers(step)) for layer in range(8))
    assert sizes["d3_bytes"] == pytest.approx(per_entry * held)
    assert sizes["ratio"] < 1


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
    assert 0 < first["imports_s"] and 0 < first["warm_s"] <= first["warm_exit_s"] and first["cold_s"] > 0
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


def test_speed_bench_times_the_bridges_and_counts_them_in_the_ideal(cli, tiny_model_dir, tmp_path, monkeypatch):
    """With a calibration, T(k) is timed with bridges too, T_bridge is their extra cost per run, and each α runs
    bridged and plain; the bridged ideal includes r̄·T_bridge."""
    from calibration_files import identity_of, profile_for

    from d3cli.evaluation.speed import steps

    # the first token in new processes is the previous test's subject; here it would only add their start-up time
    monkeypatch.setattr(steps, "first_token_seconds",
                        lambda *args: {"cold_s": 1.0, "warm_s": 1.0, "warm_exit_s": 1.0, "imports_s": 1.0})

    from d3cli.core.calibration.layer_profile import importance_order
    from d3cli.core.calibration.model_calibration import write_calibration
    from d3cli.core.decode.bridges import Bridge
    from d3cli.core.decode.schedule import runs_of_drop_order

    identity = identity_of(tiny_model_dir)
    profile = profile_for(identity)
    order = importance_order(profile)(list(range(1, 7)))
    runs = runs_of_drop_order(8, order, 2)
    path = tmp_path / "c.safetensors"
    write_calibration(path, identity, profile, [Bridge(a, b, weight=torch.randn(64, 64) / 8) for a, b in runs], {})
    result = cli(["bench", "--task", "speed", "--model", str(tiny_model_dir), "-n", "12", "--repeats", "1",
                  "--alpha", "0.8", *TINY, "--calibration", str(path), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["calibration"] == str(path) and report["skip_order"] == "importance"
    assert "t_bridge_ms" in report and "per bridged run" in " ".join(result.stderr.split())
    ordered = DecaySchedule.build(8, alpha=1.0, min_layers=2, head=1, tail=1, skip_order=lambda flex: order)
    expected_runs = {depth: len(ordered.retuned(1e-4, depth).runs_at(1)) for depth in range(2, 9)}
    for row in report["bridged_step_ms"]:
        assert row["bridged_runs"] == expected_runs[row["layers"]]
    bridged, plain = report["alphas"]
    assert bridged["bridges"] is True and plain["bridges"] is False
    assert bridged["mean_layers"] == plain["mean_layers"] and bridged["mean_bridged_runs"] > 0
    assert plain["mean_bridged_runs"] == 0
    t_fixed, t_layer, t_bridge = report["t_fixed_ms"], report["t_layer_ms"], report["t_bridge_ms"]
    full = t_fixed + 8 * t_layer
    assert bridged["ideal_speedup"] == pytest.approx(
        full / (t_fixed + bridged["mean_layers"] * t_layer + bridged["mean_bridged_runs"] * t_bridge))
    assert plain["ideal_speedup"] == pytest.approx(full / (t_fixed + plain["mean_layers"] * t_layer))


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


def test_without_llama_cpp_python_a_llama_bench_binary_times_llama_cpp(tmp_path, monkeypatch):
    """A llama.cpp build's llama-bench stands in for llama-cpp-python: asked for N − 1 decode steps after a context
    as long as the prompt, its mean step time for each step; absent both, the reason names both."""
    import sys as system

    from d3cli.evaluation.speed import side_by_side

    fake = tmp_path / "llama-bench"
    fake.write_text("#!" + system.executable + "\nimport json, sys\nopen(sys.argv[0] + '.args', 'w').write("
                    "' '.join(sys.argv[1:]))\nprint(json.dumps([{'avg_ts': 50.0, 'build_number': 7, "
                    "'build_commit': 'abc'}]))\n")
    fake.chmod(0o755)
    monkeypatch.setitem(system.modules, "llama_cpp", None)  # `import llama_cpp` fails
    monkeypatch.setenv("D3_LLAMA_BENCH", str(fake))
    side, why = side_by_side.llama_cpp_side("model.gguf", 2, 64)
    assert why == "" and isinstance(side, side_by_side.LlamaBench)
    assert side.decode_seconds([1] * 12, 9) == [0.02] * 8
    args = (tmp_path / "llama-bench.args").read_text().split()
    assert args[args.index("-d") + 1] == "12" and args[args.index("-n") + 1] == "8"
    assert args[args.index("-m") + 1] == "model.gguf" and args[args.index("-t") + 1] == "2"
    assert side.version == "llama-bench build 7 (abc)"
    monkeypatch.delenv("D3_LLAMA_BENCH")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    side, why = side_by_side.llama_cpp_side("model.gguf", 2, 64)
    assert side is None and "llama-cpp-python" in why and "llama-bench" in why


def test_a_long_prompt_is_timed_in_turns_with_llama_bench(tmp_path, monkeypatch, exact_gguf):
    """Prefill and decode after a long prompt: d3's from one run per round, llama.cpp's from llama-bench asked for
    a prompt of the same length and for decode steps after a context of that length; the ratios d3 / llama.cpp."""
    import sys as system

    from d3cli.core.model import loader
    from d3cli.evaluation.speed import side_by_side
    from d3cli.evaluation.speed.report import long_prompt_ids

    fake = tmp_path / "llama-bench"
    fake.write_text("#!" + system.executable + "\nimport json, sys\nopen(sys.argv[0] + '.args', 'a').write("
                    "' '.join(sys.argv[1:]) + '\\n')\nprint(json.dumps([{'avg_ts': 50.0}]))\n")
    fake.chmod(0o755)
    monkeypatch.setenv("D3_LLAMA_BENCH", str(fake))
    loaded = loader.load(str(exact_gguf), device="cpu")
    ids = long_prompt_ids(loaded.tokenizer, 40)
    assert len(ids) == 40
    report = side_by_side.long_prompt(loaded, ids, 5, 2, str(exact_gguf))
    assert report["llama_cpp"]["prefill_tokens_per_s"] == pytest.approx(50.0)
    assert report["llama_cpp"]["decode_tokens_per_s"] == pytest.approx(50.0)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        assert report["vs_llama_cpp"][key] == pytest.approx(report["d3"][key] / 50.0)
    calls = (tmp_path / "llama-bench.args").read_text().splitlines()
    assert len(calls) == 4
    assert sum("-p 40 -n 0" in call for call in calls) == 2
    assert sum("-p 0 -n 4 -d 40" in call for call in calls) == 2
    monkeypatch.delenv("D3_LLAMA_BENCH")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    alone = side_by_side.long_prompt(loaded, ids, 5, 1, str(exact_gguf))
    assert "llama-bench" in alone["llama_cpp"]["skipped"] and "vs_llama_cpp" not in alone


def test_llama_cpps_step_bytes_are_its_files_tensors_but_the_embedding_rows(mixed_gguf):
    from d3cli.core.model.gguf_blocks import read_gguf
    from d3cli.evaluation.speed import side_by_side

    tensors = read_gguf(mixed_gguf).tensors
    embedding = next(tensor.nbytes for tensor in tensors if tensor.name == "token_embd.weight")
    tied = "output.weight" not in {tensor.name for tensor in tensors}
    expected = sum(tensor.nbytes for tensor in tensors) - (0 if tied else embedding)
    assert side_by_side.gguf_step_bytes(str(mixed_gguf)) == expected
