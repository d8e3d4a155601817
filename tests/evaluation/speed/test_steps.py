"""The speed bench's step measurements (evaluation/speed/steps.py): mean decode depth, α 1 against the model's own
generate, the KV cache D3 holds, and step times with bridges counted in the ideal (no timing thresholds here)."""

from __future__ import annotations

import json

import pytest
import torch

from d3cli.core.decode.schedule import DecaySchedule
from d3cli.evaluation.speed.steps import alpha1_against_hf, kv_cache_bytes, mean_decode_layers

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


def test_speed_bench_times_the_bridges_and_counts_them_in_the_ideal(cli, tiny_model_dir, tmp_path, monkeypatch):
    """With a calibration, T(k) is timed with bridges too, T_bridge is their extra cost per run, and each α runs
    bridged and plain; the bridged ideal includes r̄·T_bridge."""
    from calibration_files import identity_of, profile_for

    from d3cli.evaluation.speed import startup

    # the first token in new processes is the previous test's subject; here it would only add their start-up time
    monkeypatch.setattr(startup, "first_token_seconds",
                        lambda *args: {"cold_s": 1.0, "warm_s": 1.0, "warm_exit_s": 1.0})

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
