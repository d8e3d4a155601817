"""`d3 generate` as a user meets it: stdin and stdout, JSON, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess

import pytest
from conftest import d3_executable, default_ctrl_c

JSON_KEYS = {
    "model", "alpha", "min_layers", "warmup", "head", "tail", "skip_order", "num_layers", "prompt_tokens",
    "generated_tokens", "text", "token_ids", "layers_per_token", "mean_layers", "layer_ratio", "time_s",
    "tokens_per_s", "weights", "weights_detail", "prefill_tokens_per_s", "decode_tokens_per_s", "load_s",
    "peak_memory_bytes",
}
SCHEDULE = ["--alpha", "0.8", "--min-layers", "3", "--head", "1", "--tail", "1"]


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("d3: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_piped_prompt_prints_only_the_text(cli, tiny_model_dir):
    args = ["generate", "--model", str(tiny_model_dir), "-n", "12", *SCHEDULE]
    piped = cli(args, stdin=b"Tell me a story.\n")
    assert piped.exit_code == 0, piped.stderr
    assert piped.stderr == ""
    as_json = cli([*args, "--json", "Tell me a story."])
    record = json.loads(as_json.stdout)
    assert piped.stdout == record["text"] + ("" if record["text"].endswith("\n") else "\n")
    dash = cli([*args, "-"], stdin=b"Tell me a story.")
    assert dash.stdout == piped.stdout


def test_stats_go_to_stderr(cli, tiny_model_dir):
    result = cli(["generate", "--model", str(tiny_model_dir), "-n", "8", "--stats", *SCHEDULE, "Hello"])
    assert result.exit_code == 0
    assert "mean layers" in result.stderr and "tokens/s" in result.stderr
    assert "mean layers" not in result.stdout


def test_json_has_every_key_and_consistent_numbers(cli, tiny_model_dir):
    result = cli(["generate", "--model", str(tiny_model_dir), "-n", "16", "--json", *SCHEDULE, "Hello there"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert JSON_KEYS <= record.keys()
    assert record["num_layers"] == 8 and record["layers_per_token"][0] == 8
    assert record["generated_tokens"] == len(record["token_ids"]) == len(record["layers_per_token"])
    assert record["layers_per_token"][:4] == [8, 6, 5, 4]  # floor(8 * 0.8**i), floor 3
    assert record["mean_layers"] == pytest.approx(sum(record["layers_per_token"]) / record["generated_tokens"],
                                                  abs=1e-4)
    assert record["layer_ratio"] == pytest.approx(record["mean_layers"] / 8, abs=1e-4)
    assert (record["alpha"], record["min_layers"], record["head"], record["tail"]) == (0.8, 3, 1, 1)
    assert record["tokens_per_s"] > 0 and record["time_s"] > 0
    # decode and prefill apart: the decode rate leaves the prefill's time out, the whole-reply rate does not
    decode_s = record["time_s"] - record["time_to_first_token_s"]
    assert record["decode_tokens_per_s"] == pytest.approx((record["generated_tokens"] - 1) / decode_s, rel=1e-2)
    assert record["prefill_tokens_per_s"] == pytest.approx(
        record["prompt_tokens"] / record["time_to_first_token_s"], rel=1e-2)
    assert record["load_s"] > 0 and record["peak_memory_bytes"] > 100e6


def test_compare_adds_the_full_depth_baseline(cli, tiny_model_dir):
    base = ["generate", "--model", str(tiny_model_dir), "-n", "10", "--json", "--compare", "Hello there"]
    decayed = json.loads(cli([*base, *SCHEDULE]).stdout)
    assert {"baseline", "measured_speedup", "identical"} <= decayed.keys()
    assert {"text", "token_ids", "time_s", "tokens_per_s"} <= decayed["baseline"].keys()
    assert decayed["measured_speedup"] > 0
    full = json.loads(cli([*base, "--alpha", "1"]).stdout)
    assert full["identical"] is True
    assert full["token_ids"] == full["baseline"]["token_ids"]
    assert full["baseline"]["token_ids"] == decayed["baseline"]["token_ids"]


def test_jsonl_keeps_input_order_with_per_line_options(cli, tiny_model_dir):
    lines = [
        "First prompt",
        json.dumps({"prompt": "Second prompt", "id": "b", "alpha": 1.0}),
        "",
        json.dumps({"prompt": "Third prompt", "max_new_tokens": 3, "stop": ["zzzz"]}),
        "Fourth prompt",
    ]
    args = ["generate", "--model", str(tiny_model_dir), "-n", "6", "--jsonl", *SCHEDULE]
    for batch_size in ("1", "3"):
        result = cli([*args, "--batch-size", batch_size], stdin="\n".join(lines).encode())
        assert result.exit_code == 0, result.stderr
        records = [json.loads(line) for line in result.stdout.splitlines()]
        assert [record["line"] for record in records] == [1, 2, 4, 5]
        assert records[1]["id"] == "b" and records[1]["alpha"] == 1.0
        assert records[1]["layers_per_token"] == [8] * records[1]["generated_tokens"]
        assert records[2]["generated_tokens"] <= 3
        assert all(JSON_KEYS <= record.keys() for record in records)


def test_malformed_jsonl_line_is_named(cli, tiny_model_dir):
    stdin = b'Good prompt\n{"prompt": "fine"}\n{"prompt": 3}\n{not json\n{"prompt": "x", "alpah": 0.9}\nLast\n'
    args = ["generate", "--model", str(tiny_model_dir), "-n", "4", "--jsonl", *SCHEDULE]
    strict = cli(args, stdin=stdin)
    assert strict.exit_code == 2
    assert "line 3" in strict.stderr and "Traceback" not in strict.stderr
    assert [json.loads(line)["line"] for line in strict.stdout.splitlines()] == [1, 2]
    lenient = cli([*args, "--skip-bad-lines"], stdin=stdin)
    assert lenient.exit_code == 0
    assert [json.loads(line)["line"] for line in lenient.stdout.splitlines()] == [1, 2, 6]
    assert "line 3" in lenient.stderr and "line 4" in lenient.stderr
    assert "did you mean 'alpha'" in lenient.stderr
    assert "3 bad lines skipped" in lenient.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--alpha", "0"], "alpha"),
        (["--temperature", "0.5", "--seed", str(2**64)], "seed must fit in 64 bits"),
        (["--alpha", "1.5"], "alpha"),
        (["--alpha", "fast"], "alpha"),
        (["--min-layers", "lots"], "min-layers"),
        (["--min-layers", "2", "--head", "2", "--tail", "1"], "must not exceed min-layers"),
        (["--head", "0", "--tail", "0"], "core layer"),
        (["--warmup", "-1"], "warmup"),
        (["--max-new-tokens", "0"], "max-new-tokens"),
        (["--top-p", "0.5"], "--temperature"),
        (["--temperature", "-1"], "temperature"),
        (["--no-chat", "--system", "Be brief"], "--system"),
        (["--json", "--jsonl"], "--jsonl"),
        (["--batch-size", "4"], "--jsonl"),
        (["--skip-order", "random"], "skip-order"),
        (["--device", "tpu"], "device"),
        (["--frobnicate"], "frobnicate"),
        (["--weights", "int3"], "weights"),
        (["--weights", "int4", "--device-map", "auto"], "--device-map"),
        (["--weights", "float32", "--dtype", "bfloat16"], "give one of them"),
        (["--weights", "int4", "--group-size", "48"], "--group-size"),
        (["--weights", "int8", "--dtype", "float16"], "float16"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(cli, args, fragment):
    assert_one_line_error(cli(["generate", *args, "Hello"]), fragment)


def test_model_larger_than_the_floor_is_checked_against_its_depth(cli, tiny_model_dir):
    result = cli(["generate", "--model", str(tiny_model_dir), "--min-layers", "12", "--head", "1", "--tail", "1",
                  "Hello"])
    assert_one_line_error(result, "only 8 layers")


def test_bad_models_are_one_line(cli, tmp_path):
    assert_one_line_error(cli(["generate", "--model", "no-such-org/no-such-model", "Hi"]), "no-such-org/no-such-model")
    assert_one_line_error(cli(["generate", "--model", str(tmp_path / "missing.gguf"), "Hi"]), "no such file")
    garbage = tmp_path / "broken.gguf"
    garbage.write_bytes(b"this is not a gguf file" * 10)
    assert_one_line_error(cli(["generate", "--model", str(garbage), "Hi"]), "broken.gguf")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    assert_one_line_error(cli(["generate", "--model", str(text_file), "Hi"]), "not a .gguf")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert_one_line_error(cli(["generate", "--model", str(empty_dir), "Hi"]), "config.json")


def test_bad_prompts_are_one_line(cli, tiny_model_dir):
    model = ["generate", "--model", str(tiny_model_dir)]
    assert_one_line_error(cli([*model, "   "]), "empty")
    assert_one_line_error(cli([*model], stdin=b"\n\n"), "empty")
    assert_one_line_error(cli([*model], stdin=b"caf\xe9 au lait"), "UTF-8")
    assert_one_line_error(cli([*model, "--no-chat", "word " * 600]), "context of 512")
    assert_one_line_error(cli([*model, "--jsonl", "Hello"]), "PROMPT")


# --- the real executable, in pipes and in a pseudo-terminal -------------------------------------------------------

def run_d3(args: list[str], stdin: bytes = b"", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([d3_executable(), *args], input=stdin, capture_output=True, timeout=timeout)


def test_piped_stdin_in_a_real_process(tiny_model_dir):
    result = run_d3(["generate", "--model", str(tiny_model_dir), "-n", "8", "--json", *SCHEDULE],
                    stdin=b"A prompt from a pipe")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["generated_tokens"] == 8 and record["prompt_tokens"] > 5


def test_output_closed_early_ends_quietly(tiny_model_dir):
    command = (f"set -o pipefail; {shlex.quote(d3_executable())} generate --model {shlex.quote(str(tiny_model_dir))} "
               f"-n 400 --alpha 1 'Write a long story' | head -c 20")
    result = subprocess.run(["bash", "-c", command], capture_output=True, timeout=120)
    assert len(result.stdout) == 20
    assert result.stderr == b"", result.stderr.decode()
    assert result.returncode == 141


@pytest.mark.embedded
def test_ctrl_c_keeps_the_text_and_exits_130():
    process = subprocess.Popen(
        [d3_executable(), "generate", "-n", "400", "--alpha", "1", "--no-chat", "Once upon a time"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_ctrl_c,
    )
    first = process.stdout.read(12)  # the first streamed text: generation is under way
    process.send_signal(signal.SIGINT)
    rest, errors = process.communicate(timeout=60)
    assert process.returncode == 130, errors.decode()
    assert len(first) == 12
    assert "Traceback" not in errors.decode()
    assert (first + rest).decode().strip()


def test_terminal_shows_layer_bars_and_summary(tiny_model_dir):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(d3_executable(), ["generate", "--model", str(tiny_model_dir), "-n", "24", *SCHEDULE,
                                            "--no-chat", "Hello"],
                          dimensions=(40, 100), timeout=120, encoding="utf-8", env={**os.environ, "TERM": "xterm"})
    child.expect(pexpect.EOF)
    child.close()
    screen = child.before
    assert child.exitstatus == 0, screen
    assert "D3 summary" in screen
    assert "mean layers" in screen and "speedup (estimated)" in screen
    assert "layers per token" in screen
    blocks = "▁▂▃▄▅▆▇█"
    strip = next(line for line in screen.splitlines() if "█" in line and "▅" in line)
    heights = [blocks.index(char) for char in strip if char in blocks]  # one bar per token
    assert heights[0] == len(blocks) - 1  # the first token runs at full depth
    assert heights == sorted(heights, reverse=True) and heights[-1] < heights[0]  # then the depth decays


@pytest.mark.embedded
def test_ctrl_c_on_a_terminal_keeps_the_text_and_summary():
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(d3_executable(), ["generate", "-n", "400", "--no-chat", "Once upon a time"],
                          dimensions=(30, 100), timeout=120, encoding="utf-8", env={**os.environ, "TERM": "xterm"},
                          preexec_fn=default_ctrl_c)
    child.expect("layers")  # the live status line: tokens are streaming
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130, child.before
    assert "(interrupted)" in child.before and "D3 summary" in child.before
    assert "Traceback" not in child.before


def test_jsonl_with_compare_has_a_baseline_per_line(cli, tiny_model_dir):
    result = cli(["generate", "--model", str(tiny_model_dir), "-n", "5", "--jsonl", "--compare", "--alpha", "1"],
                 stdin=b"one\ntwo\n")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [record["line"] for record in records] == [1, 2]
    assert all(record["identical"] and record["baseline"]["token_ids"] == record["token_ids"] for record in records)


def test_jsonl_answers_each_line_before_the_input_ends(tiny_model_dir):
    process = subprocess.Popen(
        [d3_executable(), "generate", "--model", str(tiny_model_dir), "-n", "4", "--jsonl", *SCHEDULE],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        process.stdin.write(b"first prompt\n")
        process.stdin.flush()
        first = json.loads(process.stdout.readline())  # arrives while stdin is still open
        assert first["line"] == 1
        process.stdin.write(b"second prompt\n")
        process.stdin.close()
        second = json.loads(process.stdout.readline())
        assert second["line"] == 2
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
