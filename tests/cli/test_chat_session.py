"""The chat's session (cli/chat_session.py): slash commands, their messages, settings checked against the model,
/save and /load, the scripted loop. On the tiny model, mostly without generating."""

from __future__ import annotations

import json

import pytest

from d3cli.cli.chat_session import COMMANDS, ChatSession
from d3cli.core.session.settings import DecodeSettings

SETTINGS = DecodeSettings(alpha=0.8, min_layers=3, head=1, tail=1, max_new_tokens=4, chat=True)
SCHEDULE_TEXT = "min-layers 3 of 8 (option), head 1, tail 1, skip order middle, not calibrated (d3 calibrate)"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from d3cli.core.model.loader import ModelOptions
    from d3cli.core.session.front_door import open_model

    return open_model(ModelOptions(model=str(tiny_model_dir)), SETTINGS).loaded


@pytest.fixture
def session(loaded):
    from d3cli.core.session.conversation import Conversation

    return ChatSession(Conversation(loaded, SETTINGS), scripted=True, as_jsonl=True)


def said(capsys) -> list[str]:
    """The lines the session wrote to stderr since the last call (scripted: its notes and errors)."""
    return capsys.readouterr().err.splitlines()


def test_settings_are_described_as_the_banner_shows_them(session):
    assert session.describe_settings() == f"α=0.8, {SCHEDULE_TEXT}"
    session.conversation.settings = DecodeSettings(alpha=1.0, head=1, tail=1)
    assert session.describe_settings() == "full depth, 8 layers (α=1, option), not calibrated (d3 calibrate)"


def test_alpha_and_min_layers_change_the_settings_and_say_so(session, capsys):
    assert session.handle("/alpha 0.9") is True
    assert said(capsys) == [f"d3: now α=0.9, {SCHEDULE_TEXT}"]
    session.handle("/min-layers 0.5")  # a fraction of the 8 layers
    assert (session.conversation.settings.alpha, session.conversation.settings.min_layers) == (0.9, 0.5)
    assert said(capsys) == [f"d3: now α=0.9, {SCHEDULE_TEXT.replace('min-layers 3', 'min-layers 4')}"]


@pytest.mark.parametrize("line, error", [
    ("/alpha 2", "alpha must lie in (0, 1], not 2"),
    ("/alpha fast", "/alpha needs a number in (0, 1], like /alpha 0.98, not 'fast'"),
    ("/min-layers", "/min-layers needs a count or a fraction of the layers, like /min-layers 24"),
    ("/min-layers 12", "only 8 layers"),  # checked against this model before it is accepted
    ("/save", "/save needs a file name, like /save chat.json"),
    ("/load", "/load needs a file name, like /load chat.json"),
    ("/alhpa 0.9", "unknown command /alhpa (did you mean '/alpha'?); /help lists them"),
])
def test_a_bad_command_is_one_error_line_and_changes_nothing(session, capsys, line, error):
    assert session.handle(line) is True  # the chat goes on
    (message,) = said(capsys)
    assert message.startswith("d3: error: ") and error in message
    assert session.conversation.settings == SETTINGS


def test_help_lists_every_command_but_the_aliases(session, capsys):
    session.handle("/help")
    (line,) = said(capsys)
    listed = [entry.split(":")[0].split()[0] for entry in line.removeprefix("d3: ").split("; ")]
    assert listed == [f"/{name}" for name, spec in COMMANDS.items() if not spec.alias]
    assert "/quit" not in listed and "/alpha X: set the decay rate α in (0, 1]" in line


@pytest.mark.parametrize("line", ["/exit", "/quit", "/EXIT"])
def test_exit_ends_the_chat(session, line):
    assert session.handle(line) is False


def test_system_and_reset(session, capsys):
    session.handle("/system Be brief.")
    assert session.conversation.system == "Be brief."
    session.conversation.messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    session.handle("/reset")
    assert session.conversation.messages == [] and session.conversation.system == "Be brief."  # the system stays
    session.handle("/system")
    assert session.conversation.system is None
    assert said(capsys) == ["d3: system message set; it applies from the next reply", "d3: conversation cleared",
                            "d3: system message removed; it applies from the next reply"]


def test_save_and_load_bring_back_messages_system_and_settings(session, loaded, tmp_path, capsys):
    from d3cli.core.session.conversation import Conversation

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    session.conversation.messages = list(messages)
    session.handle("/system Answer in French.")
    session.handle("/min-layers 5")
    path = tmp_path / "chat.json"
    session.handle(f"/save {path}")
    assert said(capsys)[-1] == f"d3: saved 2 messages to {path}"
    document = json.loads(path.read_text())
    assert (document["system"], document["messages"], document["settings"]["min_layers"]) == (
        "Answer in French.", messages, 5)

    fresh = ChatSession(Conversation(loaded, SETTINGS), scripted=True)
    fresh.handle(f"/load {path}")
    restored = fresh.conversation
    assert (restored.messages, restored.system, restored.settings.min_layers) == (messages, "Answer in French.", 5)
    assert said(capsys) == [f"d3: loaded 2 messages from {path}; now α=0.8, "
                            + SCHEDULE_TEXT.replace("min-layers 3", "min-layers 5")]


def test_stats_before_and_after_a_reply(session, capsys):
    session.handle("/stats")
    assert said(capsys) == ["d3: no replies yet"]
    session.handle("Hello")
    session.handle("Again")
    out = capsys.readouterr()
    records = [json.loads(line) for line in out.out.splitlines()]
    assert [record["turn"] for record in records] == [1, 2] and session.records == records
    assert [record["layers_per_token"] for record in records] == [[8, 6, 5, 4]] * 2  # floor(8·0.8^i), each reply
    assert [message["role"] for message in session.conversation.messages] == ["user", "assistant"] * 2
    session.handle("/stats")
    (line,) = said(capsys)
    assert line.startswith("d3: 2 replies, 8 tokens, mean layers 5.8 of 8 (71.9% of full depth), ")


def test_a_scripted_chat_skips_blank_and_undecodable_lines_and_stops_at_exit(session, capsys):
    session.run_scripted([b"/system Be kind.\n", b"\n", b"caf\xe9\n", b"/exit\n", b"/system never\n"])
    assert said(capsys) == ["d3: system message set; it applies from the next reply",
                            "d3: error: line 3 is not valid UTF-8 (byte 3): d3 reads UTF-8 text"]
    assert session.conversation.system == "Be kind." and session.records == []
