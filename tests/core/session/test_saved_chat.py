import json

import pytest

from d3cli.base.errors import UserError
from d3cli.core.session.saved_chat import read_saved_chat, write_saved_chat
from d3cli.core.session.settings import DecodeSettings

MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello — what now?"}]


def test_a_saved_chat_reads_back_as_it_was(tmp_path):
    path = tmp_path / "chat.json"
    settings = DecodeSettings(alpha=0.9, min_layers=5, stop=("END",), chat=True)
    write_saved_chat(path, "tiny", "Be brief.", settings, MESSAGES)
    system, read_settings, messages, model = read_saved_chat(path, DecodeSettings(chat=True))
    assert (system, messages, model) == ("Be brief.", MESSAGES, "tiny")
    assert read_settings == settings
    assert "Hello — what now?" in path.read_text(encoding="utf-8")  # text kept readable, not escaped


def test_settings_missing_from_the_file_keep_the_current_ones(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"format": "d3-chat", "messages": MESSAGES, "settings": {"alpha": 0.7}}))
    base = DecodeSettings(min_layers=4, chat=True)
    _, settings, _, _ = read_saved_chat(path, base)
    assert settings.alpha == 0.7 and settings.min_layers == 4


@pytest.mark.parametrize(("document", "fragment"), [
    ({"format": "d3-chat", "messages": MESSAGES, "system": 3}, '"system" must be text or null, not an integer'),
    ({"format": "d3-chat", "messages": MESSAGES, "settings": []}, '"settings" must be an object'),
    ({"format": "d3-chat", "messages": "Hi"}, '"messages" must be a list'),
    ({"format": "d3-chat", "messages": [], "settings": {"alpha": 3}}, "settings: alpha must lie in (0, 1]"),
])
def test_a_bad_saved_chat_names_the_file_and_what_is_wrong(tmp_path, document, fragment):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(document))
    with pytest.raises(UserError) as raised:
        read_saved_chat(path, DecodeSettings(chat=True))
    assert str(raised.value).startswith(str(path)) and fragment in str(raised.value)
