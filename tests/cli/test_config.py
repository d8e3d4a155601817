"""Settings from files and the environment: precedence, sources, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SCHEDULE = ["--head", "1", "--tail", "1"]


@pytest.fixture
def user_file(monkeypatch, tmp_path) -> Path:
    folder = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(folder))
    (folder / "d3").mkdir(parents=True)
    return folder / "d3" / "config.toml"


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


def test_config_show_says_where_each_value_came_from(cli, user_file, monkeypatch):
    user_file.write_text("warmup = 3\n")
    Path("d3.toml").write_text("[generate]\nstop = ['END']\n")
    monkeypatch.setenv("D3_TOP_P", "0.5")
    result = cli(["config", "show", "generate", "--json"])
    assert result.exit_code == 0, result.stderr
    settings = json.loads(result.stdout)["generate"]
    assert settings["warmup"] == {"value": 3, "source": f"user file {user_file}"}
    assert settings["stop"]["value"] == ["END"] and settings["stop"]["source"].endswith("d3.toml [generate]")
    assert settings["top_p"] == {"value": 0.5, "source": "environment D3_TOP_P"}
    assert settings["alpha"] == {"value": None, "source": "default: the model's calibrated schedule"}
    everything = json.loads(cli(["config", "show", "--json"]).stdout)
    assert {"generate", "chat"} <= everything.keys()
    table = cli(["config", "show"])
    assert "warmup" in table.stdout and "environment D3_TOP_P" in table.stdout


def test_config_path_lists_the_files_even_when_one_is_broken(cli, user_file):
    Path("d3.toml").write_text("alpha = [\n")
    result = cli(["config", "path"])
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(user_file), str(Path.cwd() / "pyproject.toml"),
                                                     str(Path.cwd() / "d3.toml")]
    assert lines[2].endswith("found") and lines[0].endswith("not found")
    assert result.exit_code == 2 and "d3.toml:2:1:" in result.stderr


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
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("d3: error: ")
    assert str(Path.cwd() / "d3.toml") in result.stderr and fragment in result.stderr, result.stderr


def test_bad_environment_values_are_one_line(cli, monkeypatch):
    monkeypatch.setenv("D3_MAX_NEW_TOKENS", "many")
    result = cli(["generate", "Hello"])
    assert result.exit_code == 2 and "D3_MAX_NEW_TOKENS" in result.stderr and result.stderr.count("\n") == 1
    monkeypatch.setenv("D3_MAX_NEW_TOKENS", "0")
    assert "D3_MAX_NEW_TOKENS: max-new-tokens must be at least 1, not 0" in cli(["generate", "Hello"]).stderr


def test_d3_paths_in_the_environment_are_not_settings(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("D3_DEBUG", "")
    monkeypatch.setenv("D3_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("D3_SOMETHING_ELSE", "1")
    assert cli(["config", "show", "--json"]).exit_code == 0


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


def test_config_show_never_prints_the_servers_api_key(cli, monkeypatch):
    monkeypatch.setenv("D3_API_KEY", "sk-very-secret")
    shown = cli(["config", "show", "serve", "--json"])
    assert shown.exit_code == 0 and "sk-very-secret" not in shown.stdout
    assert json.loads(shown.stdout)["serve"]["api_key"] == {"value": "(set, not shown)",
                                                            "source": "environment D3_API_KEY"}
