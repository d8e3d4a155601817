"""`d3 chat` through pipes (scripted) and in a real pseudo-terminal."""

from __future__ import annotations

import json
import os

import pytest
from conftest import d3_executable, default_ctrl_c

SCHEDULE = ["--alpha", "0.8", "--min-layers", "3", "--head", "1", "--tail", "1", "-n", "8"]


def chat_args(model_dir) -> list[str]:
    return ["chat", "--model", str(model_dir), *SCHEDULE]


def test_each_line_is_a_turn_and_each_reply_a_line(cli, tiny_model_dir):
    result = cli([*chat_args(tiny_model_dir), "--jsonl"], stdin=b"Hello\n\nHow are you?\nBye\n")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [record["turn"] for record in records] == [1, 2, 3]
    assert all(record["layers_per_token"][0] == 8 for record in records)  # every reply restarts at full depth
    assert all(record["layers_per_token"][1] == 6 for record in records if record["generated_tokens"] > 1)
    assert records[0]["prompt_tokens"] < records[1]["prompt_tokens"] < records[2]["prompt_tokens"]
    plain = cli(chat_args(tiny_model_dir), stdin=b"Hello\nHow are you?\nBye\n")
    assert plain.exit_code == 0
    replies = [record["text"] for record in records]
    assert plain.stdout == "".join(text if text.endswith("\n") else text + "\n" for text in replies)


def test_slash_commands_in_a_scripted_chat(cli, tiny_model_dir, tmp_path):
    saved = tmp_path / "chat.json"
    script = "\n".join([
        "Hello",
        "/alpha 2",
        "/alpha fast",
        "/min-layers 4",
        "/frobnicate",
        "/system Answer in French.",
        "Second turn",
        "/stats",
        f"/save {saved}",
        "/exit",
        "never sent",
    ]).encode()
    result = cli([*chat_args(tiny_model_dir), "--jsonl"], stdin=script)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 2  # "/exit" ended the chat before the last line
    assert records[1]["min_layers"] == 4 and records[1]["alpha"] == 0.8
    errors = [line for line in result.stderr.splitlines() if line.startswith("d3: error:")]
    assert len(errors) == 3
    assert "alpha" in errors[0] and "/alpha" in errors[1] and "/frobnicate" in errors[2]
    assert "2 replies" in result.stderr  # /stats
    document = json.loads(saved.read_text())
    assert document["system"] == "Answer in French."
    assert document["settings"]["min_layers"] == 4
    assert [message["role"] for message in document["messages"]] == ["user", "assistant"] * 2
    assert not list(tmp_path.glob(".chat.json.*"))  # no temporary file left behind


def test_load_restores_the_conversation_and_settings(cli, tiny_model_dir, tmp_path):
    saved = tmp_path / "chat.json"
    first = cli([*chat_args(tiny_model_dir), "--jsonl"], stdin=f"Hello\n/min-layers 5\n/save {saved}\n".encode())
    assert first.exit_code == 0, first.stderr
    resumed = cli([*chat_args(tiny_model_dir), "--jsonl"], stdin=f"/load {saved}\nGo on\n".encode())
    assert resumed.exit_code == 0, resumed.stderr
    (record,) = [json.loads(line) for line in resumed.stdout.splitlines()]
    assert record["min_layers"] == 5
    fresh = json.loads(cli([*chat_args(tiny_model_dir), "--jsonl"], stdin=b"Go on\n").stdout)
    assert record["prompt_tokens"] > fresh["prompt_tokens"]  # the loaded turns are in the prompt


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "cannot read"),
        ("{not json", "not a saved chat"),
        ('{"format": "other"}', "not a chat saved by d3"),
        ('{"format": "d3-chat", "messages": [{"role": "robot", "content": "x"}]}', "messages"),
        ('{"format": "d3-chat", "messages": [], "settings": {"alpah": 0.9}}', "did you mean 'alpha'"),
        ('{"format": "d3-chat", "messages": [], "settings": {"alpha": 3}}', "alpha"),
    ],
)
def test_a_bad_load_file_is_one_line_and_the_chat_goes_on(cli, tiny_model_dir, tmp_path, content, fragment):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    result = cli([*chat_args(tiny_model_dir), "--jsonl"], stdin=f"/load {path}\nHello\n".encode())
    assert result.exit_code == 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("d3: error:")]
    assert len(errors) == 1 and fragment in errors[0]
    assert len(result.stdout.splitlines()) == 1  # the chat went on to answer "Hello"


def test_save_to_an_unwritable_place_is_one_line(cli, tiny_model_dir, tmp_path):
    result = cli(chat_args(tiny_model_dir), stdin=f"Hi\n/save {tmp_path}/missing/dir/chat.json\n".encode())
    assert result.exit_code == 0
    assert "cannot write" in result.stderr


def test_chat_options_are_checked_before_loading(cli):
    result = cli(["chat", "--alpha", "0"], stdin=b"Hi\n")
    result.assert_user_error("alpha")


# --- a real terminal ----------------------------------------------------------------------------------------------


def spawn_chat(args, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "TERM": "xterm", "XDG_STATE_HOME": str(tmp_path / "state")}
    return pexpect.spawn(d3_executable(), args, dimensions=(40, 120), timeout=120, encoding="utf-8", env=env,
                         preexec_fn=default_ctrl_c)


def test_terminal_chat_replies_with_bars_and_a_summary_line(tiny_model_dir, tmp_path):
    import pexpect

    child = spawn_chat(chat_args(tiny_model_dir), tmp_path)
    child.expect("you ❯ ")
    child.sendline("Hello there")
    child.expect(r"\d+ tokens \((length|eos)\) · [\d.]+/8 layers")
    child.expect("you ❯ ")
    child.sendline("/help")
    child.expect("/min-layers")
    child.expect("you ❯ ")
    child.sendline("/alpha 7")
    child.expect("alpha must lie in")
    child.expect("you ❯ ")
    child.sendeof()  # Ctrl-D at an empty prompt
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert (tmp_path / "state" / "d3" / "chat_history").read_text().count("Hello there") == 1


@pytest.mark.embedded
def test_ctrl_c_stops_a_reply_and_returns_to_the_prompt(tmp_path):
    import pexpect

    child = spawn_chat(["chat", "-n", "400", "--min-layers", "28"], tmp_path)
    child.expect("you ❯ ")
    child.sendline("Write a very long story about a dragon.")
    child.expect("layers")  # the live status line: the reply is streaming
    child.sendintr()
    child.expect(r"\(interrupted\)")
    child.expect("you ❯ ")
    child.sendline("/stats")
    child.expect("session")
    child.expect("you ❯ ")
    assert "replies" in child.before
    child.sendintr()  # Ctrl-C at an empty prompt leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in child.before


def test_arrow_up_recalls_the_previous_message(tiny_model_dir, tmp_path):
    import pexpect

    child = spawn_chat(chat_args(tiny_model_dir), tmp_path)
    child.expect("you ❯ ")
    child.sendline("/system Be brief.")
    child.expect("system message set")
    child.expect("you ❯ ")
    child.send("\x1b[A")  # arrow up brings back "/system Be brief."
    child.sendline("")
    child.expect("system message set")  # ...which ran a second time
    child.expect("you ❯ ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_a_full_context_drops_the_oldest_turns_with_a_notice(cli, tiny_model_dir):
    long_message = ("word " * 150).strip()  # the tiny model has 512 positions
    result = cli([*chat_args(tiny_model_dir), "--jsonl", "--system", "Be calm."],
                 stdin=("\n".join([long_message] * 4) + "\n").encode())
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 4
    assert "dropped the" in result.stderr and "oldest" in result.stderr
    assert all(record["prompt_tokens"] + record["generated_tokens"] <= 512 for record in records)
