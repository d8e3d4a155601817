"""Where d3 keeps its files: the XDG base directories (cache, config, state), each overridable as the spec says."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[1] / "profiles"  # data shipped in the package

def _xdg(variable: str, default: Path) -> Path:
    value = os.environ.get(variable)
    return Path(value).expanduser() if value else default


def cache_home() -> Path:
    """d3's cache folder: $D3_CACHE_DIR, else $XDG_CACHE_HOME/d3, else ~/.cache/d3."""
    if os.environ.get("D3_CACHE_DIR"):
        return Path(os.environ["D3_CACHE_DIR"]).expanduser()
    return _xdg("XDG_CACHE_HOME", Path.home() / ".cache") / "d3"


def config_home() -> Path:
    """d3's user configuration folder: $XDG_CONFIG_HOME/d3, else ~/.config/d3."""
    return _xdg("XDG_CONFIG_HOME", Path.home() / ".config") / "d3"


def state_home() -> Path:
    """d3's state folder (chat history): $XDG_STATE_HOME/d3, else ~/.local/state/d3."""
    return _xdg("XDG_STATE_HOME", Path.home() / ".local" / "state") / "d3"


@contextlib.contextmanager
def exclusive(name: str):
    """Held by one process or thread at a time (a lock file in d3's cache, `locks/NAME.lock`): processes started
    together on a fresh cache (accelerate, torchrun, two shells) make a cached thing once while the others wait."""
    import fcntl

    lock_file = cache_home() / "locks" / f"{name}.lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
