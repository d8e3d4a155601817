"""`d3 config show` and `d3 config path` (commands/config.py): each setting's value and source, the files read."""

from __future__ import annotations

import json
from pathlib import Path


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


def test_config_show_never_prints_the_servers_api_key(cli, monkeypatch):
    monkeypatch.setenv("D3_API_KEY", "sk-very-secret")
    shown = cli(["config", "show", "serve", "--json"])
    assert shown.exit_code == 0 and "sk-very-secret" not in shown.stdout
    assert json.loads(shown.stdout)["serve"]["api_key"] == {"value": "(set, not shown)",
                                                            "source": "environment D3_API_KEY"}


def test_config_show_gives_the_built_in_defaults_where_nothing_is_set(cli):
    from d3cli.evaluation.calibrate.schedule_choice import DEFAULT_NLL_BUDGET

    result = cli(["config", "show", "calibrate", "--json"])
    assert result.exit_code == 0, result.stderr
    settings = json.loads(result.stdout)
    assert list(settings) == ["calibrate"]
    assert settings["calibrate"]["prompts"] == {"value": 64, "source": "default"}
    assert settings["calibrate"]["budget"] == {"value": DEFAULT_NLL_BUDGET, "source": "default"}
    assert settings["calibrate"]["time_limit"] == {"value": None, "source": "default"}


def test_config_show_of_an_unknown_subcommand_names_the_known_ones(cli):
    result = cli(["config", "show", "generat"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == ("d3: error: unknown subcommand 'generat' (choose from: generate, chat, bench, "
                             "profile-ppl, calibrate, serve)\n")


def test_config_show_of_a_broken_file_is_one_line_naming_it(cli):
    Path("d3.toml").write_text("[chat]\nalpha = 'fast'\n")
    result = cli(["config", "show"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (f"d3: error: {Path.cwd() / 'd3.toml'}: key 'alpha' in [chat] must be a number, not a "
                             "string\n")
