"""evaluation/speed/startup.py: new processes timed to their first line and their exit, cold against warm caches,
and the stages of a warm start measured in a new process."""

from __future__ import annotations

import sys

import pytest

from d3cli.evaluation.speed import startup

COLD_THEN_WARM = """
import os, sys, time
marker = os.path.join(os.environ["D3_CACHE_DIR"], "filled")
cold = not os.path.exists(marker)
if cold:
    time.sleep(0.4)  # a cold start converts the model
    open(marker, "w").close()
print("cold" if cold else "warm", flush=True)
time.sleep(0.1)
"""


def test_a_process_is_timed_to_its_first_line_and_to_its_exit():
    first, exited, line = startup.first_line_seconds(
        [sys.executable, "-c", "import sys, time; print(sys.stdin.read().strip(), flush=True); time.sleep(0.3)"],
        "hello\n")
    assert 0 < first < exited and exited - first >= 0.25 and line == "hello\n"


def test_each_call_asks_another_question():
    asked = [startup.question(call) for call in range(len(startup.QUESTIONS))]
    assert len(set(asked)) == len(asked) and startup.question(len(asked)) == asked[0]


def test_a_failing_process_says_why():
    with pytest.raises(RuntimeError, match="no model here"):
        startup.first_line_seconds([sys.executable, "-c", "import sys; sys.exit('no model here')", "x", "y"], "")


def test_cold_runs_in_an_empty_cache_and_warm_in_the_one_it_filled(monkeypatch):
    monkeypatch.setattr(startup, "generate_command", lambda model_args, *extra: [sys.executable, "-c",
                                                                                  COLD_THEN_WARM])
    found = startup.first_token_seconds([], rounds=2)
    assert found["runs"] == 2 and found["cold_s"] > found["warm_s"] + 0.3  # every round starts from an empty cache
    assert found["warm_s"] < found["warm_exit_s"]


@pytest.mark.embedded
def test_the_stages_of_a_warm_start_add_up_to_less_than_the_whole(embedded):
    stages = startup.stages({"model": None}, rounds=1)
    parts = ("torch_import_s", "cli_import_s", "kernels_s", "open_model_s", "first_token_s")
    assert all(stages[key] > 0 for key in ("python_s", "torch_import_s", "cli_import_s", "open_model_s",
                                           "first_token_s", "total_s"))
    assert sum(stages[key] for key in parts) <= stages["total_s"]
    # the embedded file's transformers start (the fixture) was recorded: the child takes the lean start, whose
    # tokenizer and weights are timed, and never imports transformers
    assert not stages["transformers_imported"]
    assert stages["tokenizer_s"] > 0 and stages["weights_s"] > 0 and stages["header_s"] > 0
    assert stages["header_s"] + stages["tokenizer_s"] + stages["weights_s"] <= stages["open_model_s"]


def test_through_a_server_with_and_without_its_prompt_cache(tiny_model_dir):
    """Two real servers of the tiny model asked in turns: only the cached one reuses the template's start, and each
    side reports the client's and the server's own time to the first token."""
    served = startup.through_server(["--model", str(tiny_model_dir)], rounds=2, calls=1, on_status=lambda line: None)
    assert 0 < served["cached_prompt_tokens"] < served["prompt_tokens"]  # the second question reused the first's start
    for key in ("first_token_s", "first_token_no_prompt_cache_s", "server_first_token_s",
                "server_first_token_no_prompt_cache_s", "local_calls_s", "server_calls_s"):
        assert served[key] > 0, key
    assert served["server_first_token_s"] < served["first_token_s"] and served["calls"] == 1
