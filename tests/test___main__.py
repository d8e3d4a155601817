"""`python -m d3cli` is the `d3` command: the same output, and the same exit code (a user error exits 2)."""

import subprocess
import sys

import d3cli


def python_m_d3cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "d3cli", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def test_version():
    result = python_m_d3cli("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"d3 {d3cli.__version__}\n", "")


def test_help_lists_the_commands():
    result = python_m_d3cli("--help")
    assert result.returncode == 0 and result.stderr == ""
    assert "Usage: d3 [OPTIONS] COMMAND [ARGS]..." in result.stdout
    for command in ("generate", "chat", "bench", "calibrate", "profile-ppl", "serve", "config"):
        assert command in result.stdout, command


def test_a_user_error_exits_2_with_one_line():
    result = python_m_d3cli("generate", "--batch-size", "0", "Hello")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "d3: error: --batch-size must be at least 1, not 0\n"


def test_importing_the_module_runs_nothing():
    result = subprocess.run([sys.executable, "-c", "import d3cli.__main__"], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
