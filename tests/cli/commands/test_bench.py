"""`d3 bench` at the command line: its options, and the mistakes refused before any model or data loads. Those that
need the data or the model are here too, each one line and exit 2; the runs themselves are
tests/evaluation/bench/test_runner.py's (lm-eval's: tests/evaluation/harness/)."""

from __future__ import annotations

import pytest

from d3cli.cli.commands.bench import model_slug


def test_help_lists_the_task_method_and_output_options(cli):
    result = cli(["bench", "--help"])
    assert result.exit_code == 0 and result.stderr == ""
    for option in ("--task", "--subtasks", "--limit", "--shots", "--chat", "--data-dir", "--methods", "--include-path",
                   "--model", "--alpha", "--min-layers", "--batch-size", "--output", "--resume", "--json", "--repeats",
                   "--quick"):
        assert option in result.stdout, option


@pytest.mark.parametrize("args, message", [
    (["--quick"], "--quick applies to --task speed only"),
    (["--task", "speed", "--repeats", "0"], "--repeats must be at least 1, not 0"),
    (["--repeats", "many"], "Invalid value for '--repeats'"),
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--task", "lm-eval:gsm8k", "--subtasks", "navigate"], "--subtasks and --resume apply to d3's own tasks"),
    (["--task", "lm-eval:gsm8k", "--include-path", "no-such-folder"], "--include-path no-such-folder is not a folder"),
])
def test_a_mistake_is_one_line_and_exit_2_before_anything_loads(cli, nothing_loads, args, message):
    result = cli(["bench", *args])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("d3: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("name, slug", [
    ("SmolLM2-135M-Instruct (embedded)", "smollm2-135m-instruct"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "qwen-qwen2.5-0.5b-instruct"),
    ("/home/me/models/my model.gguf", "home-me-models-my-model.gguf"),
    ("///", "model"),
])
def test_the_default_output_file_is_named_after_the_model(name, slug):
    assert model_slug(name) == slug


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--task", "mmlu"], "unknown task 'mmlu'"),
        (["--task", "bbh", "--subtasks", "navigat"], "did you mean 'navigate'"),
        (["--limit", "0"], "--limit"),
        (["--alpha", "0.9,fast"], "--alpha takes numbers"),
        (["--alpha", "0.9,1.5"], "(0, 1]"),
        (["--methods", "d3,magic"], "unknown method 'magic'"),
        (["--methods", "d3,linear+bridges"], "add d3+bridges"),
        (["--shots", "12"], "0 to 8 shots"),
    ],
)
def test_bad_bench_options_are_one_line(cli, shared_data, args, fragment):
    result = cli(["bench", "--data-dir", str(shared_data), *args])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.count("\n") == 1 and fragment in result.stderr


def test_missing_or_malformed_data_is_one_line(cli, tmp_path, shared_data):
    result = cli(["bench", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "gsm8k/test.jsonl" in result.stderr and result.stderr.count("\n") == 1
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    (tmp_path / "gsm8k" / "train.jsonl").write_bytes((shared_data / "gsm8k" / "train.jsonl").read_bytes())
    result = cli(["bench", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "test.jsonl:2: not valid JSON" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--task", "lm-eval:"], "needs task names"),
    (["--task", "lm-eval:gsm8k_cot", "--resume"], "--resume apply to d3's own tasks"),
    (["--task", "gsm8k", "--include-path", "."], "--include-path applies to --task lm-eval"),
    (["--task", "lm-eval:no_such_task", "--limit", "1"], "lm-eval could not run no_such_task"),
    (["--task", "lm-eval:gsm8k_cot", "--temperature", "0.7"], "an lm-eval task samples as its generation_kwargs"),
])
def test_bad_lm_eval_benches_are_one_line(cli, tiny_model_dir, shared_data, args, message):
    pytest.importorskip("lm_eval")
    result = cli(["bench", "--model", str(tiny_model_dir), "--data-dir", str(shared_data), *args])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
