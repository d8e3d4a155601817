"""cli/config.py: settings from files and the environment: precedence, sources, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SCHEDULE = ["--head", "1", "--tail", "1"]


def generated(cli, model_dir, *args, stdin=b"") -> dict:
    result = cli(["generate", "--model", str(model_dir), *SCHEDULE, "--json", *args, "Hello"], stdin=stdin)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_precedence_command_line_environment_project_user_default(cli, tiny_model_dir, user_file, monkeypatch):
    user_file.write_text("alpha = 0.5\nwarmup = 1\nmax_new_tokens = 3\nmin_layers = 4\n")
    record = generated(cli, tiny_model_dir)
    assert (record["alpha"], record["warmup"], record["generated_tokens"], record["min_layers"]) == (0.5, 1, 3, 4)
    Path("pyproject.toml").write_text('[project]\nname = "x"\n[tool.d3]\nalpha = 0.6\nwarmup = 2\n')
    record = generated(cli, tiny_model_dir)
    assert (record["alpha"], record["warmup"]) == (0.6, 2)
    Path("d3.toml").write_text("alpha = 0.7\n[generate]\nmin_layers = 5\n[chat]\nmin_layers = 6\n")
    record = generated(cli, tiny_model_dir)
    assert (record["alpha"], record["warmup"], record["min_layers"]) == (0.7, 2, 5)  # d3.toml over pyproject
    monkeypatch.setenv("D3_ALPHA", "0.8")
    assert generated(cli, tiny_model_dir)["alpha"] == 0.8
    monkeypatch.setenv("D3_GENERATE_ALPHA", "0.85")
    assert generated(cli, tiny_model_dir)["alpha"] == 0.85
    assert generated(cli, tiny_model_dir, "--alpha", "0.9")["alpha"] == 0.9


def test_chat_reads_its_own_table_and_the_shared_keys(cli, tiny_model_dir, monkeypatch):
    Path("d3.toml").write_text("alpha = 0.7\nmax_new_tokens = 2\n[chat]\nmin_layers = 6\n[generate]\nmin_layers = 5\n")
    monkeypatch.setenv("D3_GENERATE_ALPHA", "0.85")  # not for chat
    result = cli(["chat", "--model", str(tiny_model_dir), *SCHEDULE, "--jsonl"], stdin=b"Hi\n")
    record = json.loads(result.stdout)
    assert (record["alpha"], record["min_layers"], record["generated_tokens"]) == (0.7, 6, 2)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("alpha = \n", "d3.toml:1:9: "),
        ("[generate\n", "d3.toml:1:"),
        ("alpah = 0.9\n", "unknown key 'alpah' (did you mean 'alpha'?)"),
        ("[generate]\nmax_new_token = 3\n", "unknown key 'max_new_token' in [generate] (did you mean 'max_new_tokens'?)"),
        ("[genrate]\nalpha = 0.9\n", "unknown table [genrate] (did you mean 'generate'?)"),
        ("alpha = 'fast'\n", "key 'alpha' must be a number, not a string"),
        ("alpha = 1.5\n", "key 'alpha' alpha must lie in (0, 1], not 1.5"),
        ("[chat]\ntop_p = 0\n", "key 'top_p' in [chat] top-p must lie in (0, 1], not 0"),
        ("head = -2\n", "key 'head' head must be >= 0, not -2"),
        ("[bench]\nalpha = '0.98,1.5'\n", "key 'alpha' in [bench] alpha must lie in (0, 1], not 1.5"),
        ("[bench]\nalpha = '0.98,fast'\n", "--alpha takes numbers separated by commas"),
        ("warmup = 1.5\n", "key 'warmup' must be an integer, not a number"),
        ("[generate]\ndevice = 'tpu'\n", "key 'device' in [generate] must be one of auto, cpu, cuda, mps"),
        ("skip_order = 'midle'\n", "did you mean 'middle'?"),
        ("min_layers = 'lots'\n", "key 'min_layers'"),
        ("stop = 3\n", "key 'stop' must be a list of strings"),
        ("trust_remote_code = 'yes'\n", "key 'trust_remote_code' must be true or false"),
    ],
)
def test_a_bad_file_is_one_line_naming_file_and_key(cli, content, fragment):
    Path("d3.toml").write_text(content)
    result = cli(["generate", "Hello"])
    result.assert_user_error()
    assert str(Path.cwd() / "d3.toml") in result.stderr and fragment in result.stderr, result.stderr


def test_bad_environment_values_are_one_line(cli, monkeypatch):
    monkeypatch.setenv("D3_MAX_NEW_TOKENS", "many")
    result = cli(["generate", "Hello"])
    result.assert_user_error("D3_MAX_NEW_TOKENS")
    monkeypatch.setenv("D3_MAX_NEW_TOKENS", "0")
    assert "D3_MAX_NEW_TOKENS: max-new-tokens must be at least 1, not 0" in cli(["generate", "Hello"]).stderr


def test_d3_paths_in_the_environment_are_not_settings(cli, monkeypatch, tmp_path):
    """D3_DATA_DIR is d3's data folder, not bench's --data-dir (D3_BENCH_DATA_DIR is); D3_DEBUG and unknown names
    are no setting at all."""
    monkeypatch.setenv("D3_DEBUG", "")
    monkeypatch.setenv("D3_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("D3_SOMETHING_ELSE", "1")
    result = cli(["config", "show", "--json"])
    assert result.exit_code == 0, result.stderr
    settings = json.loads(result.stdout)
    assert settings["bench"]["data_dir"] == settings["profile-ppl"]["data_dir"] == {"value": None, "source": "default"}
    sources = {setting["source"] for command in settings.values() for setting in command.values()}
    assert not any(name in source for source in sources for name in ("D3_DEBUG", "D3_DATA_DIR", "D3_SOMETHING"))
    monkeypatch.setenv("D3_BENCH_DATA_DIR", str(tmp_path / "bench"))
    settings = json.loads(cli(["config", "show", "bench", "--json"]).stdout)
    assert settings["bench"]["data_dir"] == {"value": str(tmp_path / "bench"),
                                             "source": "environment D3_BENCH_DATA_DIR"}


def test_every_subcommand_option_is_configurable():
    from d3cli.cli.app import app
    from d3cli.cli.config import option_specs, subcommands

    specs = {name: option_specs(callback) for name, callback in subcommands(app).items()}
    assert {"generate", "chat"} <= specs.keys()
    for key in ("model", "alpha", "min_layers", "head", "tail", "warmup", "skip_order", "max_new_tokens", "stop",
                "device", "dtype", "system", "temperature", "seed"):
        assert key in specs["generate"] and key in specs["chat"]
    assert specs["generate"]["device"].choices == ("auto", "cpu", "cuda", "mps")
    assert specs["generate"]["stop"].multiple and specs["generate"]["json"].kind == "boolean"

def test_a_file_cut_short_or_not_utf8_is_located(tmp_path):
    from d3cli.base.errors import UserError
    from d3cli.cli.config import read_toml

    cut = tmp_path / "cut.toml"
    cut.write_text("alpha = [1,\n")
    with pytest.raises(UserError, match=r"^.*cut\.toml:2:1: Invalid value \(at the end of the file\)$"):
        read_toml(cut)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'system = "caf\xe9"\n')
    with pytest.raises(UserError, match=r"latin\.toml:1:1: not UTF-8 text \(byte 13\)$"):
        read_toml(latin)


@pytest.mark.parametrize("order", [("D3_GENERATE_ALPHA", "D3_ALPHA"), ("D3_ALPHA", "D3_GENERATE_ALPHA")])
def test_a_subcommands_own_variable_wins_over_the_shared_one_in_either_order(order):
    from d3cli.cli.app import app
    from d3cli.cli.config import load_configuration

    values = {"D3_GENERATE_ALPHA": "0.5", "D3_ALPHA": "0.9"}
    configuration = load_configuration(app, environ={name: values[name] for name in order})
    assert configuration.by_command["generate"]["alpha"].value == 0.5
    assert configuration.by_command["generate"]["alpha"].source == "environment D3_GENERATE_ALPHA"
    assert configuration.by_command["chat"]["alpha"].value == 0.9
    assert configuration.default_map()["generate"] == {"alpha": 0.5}


@pytest.mark.parametrize("text, value", [("1", True), ("yes", True), ("ON", True), ("0", False), ("off", False),
                                         ("", False)])
def test_a_boolean_variable_reads_the_usual_spellings(text, value):
    from d3cli.cli.app import app
    from d3cli.cli.config import load_configuration

    configuration = load_configuration(app, environ={"D3_GENERATE_JSON": text})
    assert configuration.by_command["generate"]["json"].value is value


def test_pyproject_counts_only_its_tool_d3_table(tmp_path):
    from d3cli.base.errors import UserError
    from d3cli.cli.app import app
    from d3cli.cli.config import load_configuration

    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nalpha = "not d3\'s"\n')
    configuration = load_configuration(app, cwd=tmp_path, environ={})
    assert configuration.by_command["generate"] == {} and (tmp_path / "pyproject.toml", True) in configuration.files
    (tmp_path / "pyproject.toml").write_text("[tool]\nd3 = 3\n")
    with pytest.raises(UserError, match=r"pyproject\.toml: \[tool\.d3\] must be a table$"):
        load_configuration(app, cwd=tmp_path, environ={})
