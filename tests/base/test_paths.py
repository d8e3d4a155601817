from pathlib import Path

from d3cli.base import paths


def test_each_folder_follows_its_environment_variable_then_the_xdg_default(monkeypatch, tmp_path):
    for variable in ("D3_CACHE_DIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.cache_home() == tmp_path / "home" / ".cache" / "d3"
    assert paths.config_home() == tmp_path / "home" / ".config" / "d3"
    assert paths.state_home() == tmp_path / "home" / ".local" / "state" / "d3"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xc"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xf"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xs"))
    assert (paths.cache_home(), paths.config_home(), paths.state_home()) == \
        (tmp_path / "xc" / "d3", tmp_path / "xf" / "d3", tmp_path / "xs" / "d3")
    monkeypatch.setenv("D3_CACHE_DIR", "~/own-cache")  # d3's own variable wins, ~ expanded
    assert paths.cache_home() == Path(tmp_path / "home" / "own-cache")


def test_an_empty_variable_counts_as_unset(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("D3_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert paths.cache_home() == tmp_path / ".cache" / "d3"
