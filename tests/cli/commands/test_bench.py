"""`d3 bench` at the command line: its options, and the mistakes refused before any model or data loads. Those that
need the data or the model are here too, each one line and exit 2; the runs themselves are
tests/evaluation/bench/test_runner.py's (lm-eval's: tests/evaluation/harness/)."""

from __future__ import annotations

import json

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
    (["--quick"], "--quick applies to --task speed and startup only"),
    (["--task", "speed", "--repeats", "0"], "--repeats must be at least 1, not 0"),
    (["--repeats", "many"], "Invalid value for '--repeats'"),
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--task", "lm-eval:gsm8k", "--subtasks", "navigate"], "--subtasks and --resume apply to d3's own tasks"),
    (["--task", "lm-eval:gsm8k", "--include-path", "no-such-folder"], "--include-path no-such-folder is not a folder"),
])
def test_a_mistake_is_one_line_and_exit_2_before_anything_loads(cli, nothing_loads, args, message):
    result = cli(["bench", *args])
    result.assert_user_error(message, nothing_printed=True)


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
    result.assert_user_error(fragment)


def test_missing_or_malformed_data_is_one_line(cli, tmp_path, shared_data):
    result = cli(["bench", "--data-dir", str(tmp_path)])
    result.assert_user_error("gsm8k/test.jsonl")
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
    result.assert_user_error(message)


STARTUP = {"model_args": ["--model", "m.gguf"], "rounds": 3,
           "first_token": {"cold_s": 20.5, "warm_s": 1.75, "warm_exit_s": 1.9, "runs": 3},
           "stages": {"python_s": 0.02, "torch_import_s": 0.99, "cli_import_s": 0.21, "kernels_s": 0.01,
                      "config_s": 0.0, "tokenizer_s": 0.09, "weights_s": 0.11, "open_model_s": 0.3,
                      "first_token_s": 0.14, "total_s": 1.63, "transformers_imported": False},
           "server": {"first_token_s": 0.33, "calls": 20, "local_calls_s": 36.2, "server_calls_s": 6.9,
                      "calls_speedup": 36.2 / 6.9}}


def test_the_startup_task_reports_new_processes_the_server_and_the_stages(cli, monkeypatch):
    from d3cli.evaluation.speed import startup

    asked = []
    monkeypatch.setattr(startup, "measure", lambda args, options, rounds, calls, on_status: asked.append(
        (args, options["model"], rounds, calls)) or STARTUP)
    result = cli(["bench", "--task", "startup", "--model", "m.gguf", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == STARTUP
    assert asked == [(["--model", "m.gguf", "--device", "auto", "--dtype", "auto"], "m.gguf", 3, 20)]
    shown = " ".join(result.stderr.split())
    assert "through a running d3 serve: first token 0.33 s 20 one-prompt calls 6.9 s through the server against 36.2 s " \
        "locally (5.2×" in shown
    quick = cli(["bench", "--task", "startup", "--quick", "--json"])
    assert quick.exit_code == 0 and asked[-1][2:] == (1, 5)
