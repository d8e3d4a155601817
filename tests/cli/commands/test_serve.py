"""`d3 serve` at the command line: its options, what it hands the server, and mistakes refused before it listens.
The server itself, and the mistakes that need the server's packages or a socket, are tests/server/test_app.py's
and test_routes.py's."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def started(monkeypatch):
    """What `d3 serve` would start: the address it binds and what it hands the server, in place of listening."""
    import d3cli.server.app

    seen = {}

    def bind(host, port):
        seen["address"] = (host, port)
        return "socket"

    def serve(config, sock, log):
        seen.update(config=config, sock=sock, log=log)

    monkeypatch.setattr(d3cli.server.app, "bind", bind)
    monkeypatch.setattr(d3cli.server.app, "serve", serve)
    return seen


def test_help_lists_the_server_options(cli):
    result = cli(["serve", "--help"])
    assert result.exit_code == 0 and result.stderr == ""
    for option in ("--host", "--port", "--api-key", "--queue-size", "--batch-size", "--log-format", "--model",
                   "--alpha", "--min-layers", "--temperature", "--max-new-tokens"):
        assert option in result.stdout, option


def test_the_options_become_the_servers_config_and_defaults(cli, started, capsys):
    result = cli(["serve", "--model", "some/model", "--host", "0.0.0.0", "--port", "0", "--alpha", "0.9",
                  "--min-layers", "4", "--max-new-tokens", "64", "--api-key", "sk-test", "--queue-size", "3",
                  "--batch-size", "2", "--log-format", "json"])
    assert result.exit_code == 0, result.stderr
    config = started["config"]
    assert started["address"] == ("0.0.0.0", 0) and started["sock"] == "socket"
    assert (config.api_key, config.queue_size, config.max_batch) == ("sk-test", 3, 2)
    assert config.model_options.model == "some/model" and config.model_options.lean  # the server only decodes
    assert (config.settings.alpha, config.settings.min_layers, config.settings.max_new_tokens) == (0.9, 4, 64)
    started["log"]({"event": "ready"})  # --log-format json: one JSON object a line on stderr
    assert json.loads(capsys.readouterr().err)["event"] == "ready"


def test_by_default_it_answers_this_machine_only(cli, started):
    assert cli(["serve"]).exit_code == 0
    config = started["config"]
    assert started["address"] == ("127.0.0.1", 8000)
    assert (config.api_key, config.queue_size, config.max_batch, config.settings.alpha) == (None, 16, 1, None)


@pytest.mark.parametrize("args, message", [
    (["--port", "-1"], "--port must lie in 0..65535, not -1"),
    (["--port", "http"], "Invalid value for '--port'"),
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--log-format", "xml"], "Invalid value for '--log-format'"),
    (["--temperature", "-1"], "temperature must be >= 0, not -1.0"),
    (["--alpha", "2"], "alpha must lie in (0, 1]"),
    (["--port", "70000"], "--port must lie in 0..65535"),
    (["--queue-size", "0"], "--queue-size must be at least 1"),
    (["--min-layers", "many"], "min-layers must be"),
    (["--api-key", " "], "--api-key must not be empty"),
])
def test_a_mistake_is_one_line_and_exit_2_before_it_listens(cli, started, args, message):
    result = cli(["serve", *args])
    result.assert_user_error(message, nothing_printed=True)
    assert started == {}


def test_the_api_key_may_come_from_the_environment(cli, started, monkeypatch):
    monkeypatch.setenv("D3_API_KEY", "sk-from-env")
    assert cli(["serve"]).exit_code == 0
    assert started["config"].api_key == "sk-from-env"
    assert cli(["serve", "--api-key", "sk-option"]).exit_code == 0
    assert started["config"].api_key == "sk-option"  # the command line wins
