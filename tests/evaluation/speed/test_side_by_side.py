"""The side-by-side timings (evaluation/speed/side_by_side.py): sides taking turns and their limits, llama.cpp
through a llama-bench binary, a long prompt timed in turns, and the bytes a llama.cpp step reads."""

from __future__ import annotations

import pytest

from d3cli.evaluation.speed import side_by_side


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


def test_sides_take_turns_each_round_and_each_step_is_its_median_over_the_rounds():
    calls = []

    def side(name, weights, step_s, step_bytes, stalled_round=None):
        timed = []

        def decode(count):
            calls.append((name, count))
            if count == 8:  # the untimed warm-up before each timed decode
                return [1.0] * count
            timed.append(count)
            stall = len(timed) - 1 == stalled_round
            return [step_s] * (count - 1) + [5.0 if stall else step_s]

        return side_by_side.Side(name, weights, decode, step_bytes, mean_layers=None)

    sides = [side("d3", "float32", 0.01, 100.0, stalled_round=1), side("llama", "llama.cpp", 0.02, 50.0)]
    rows = side_by_side.with_llama_ratios(side_by_side.compare(sides, tokens=12, repeats=3, bandwidth=1e4))
    order = [name for name, count in calls if count == 12]
    assert order == ["d3", "llama", "llama", "d3", "d3", "llama"]  # the order rotates by round
    assert calls[:2] == [("d3", 8), ("d3", 12)]  # each timed decode right after its warm-up
    d3, llama = rows
    assert d3["tokens_per_s"] == pytest.approx(100.0) and d3["step_ms"] == pytest.approx(10.0)  # the stall: no effect
    assert (d3["limit_tokens_per_s"], d3["of_limit"]) == pytest.approx((100.0, 1.0))
    assert (llama["tokens_per_s"], llama["limit_tokens_per_s"], llama["of_limit"]) == pytest.approx((50.0, 200.0, 0.25))
    assert (d3["vs_llama_cpp"], llama["vs_llama_cpp"]) == pytest.approx((2.0, 1.0))
    assert side_by_side.with_llama_ratios([dict(d3)])[0]["vs_llama_cpp"] is None  # no llama.cpp row
    assert side_by_side.median_step_ms([[0.001, 0.002], [0.003]]) == pytest.approx(2.0)
