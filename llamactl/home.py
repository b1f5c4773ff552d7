"""Where llamactl keeps things: one place that knows every path under the llamactl home.

`$LLAMACTL_HOME` (default: the user data directory, `~/.local/share/llamactl` on Linux) holds
`models/<name>/` (the store), `cache/` (file hashes, compiled kernels) and `chat_history`.
"""

from __future__ import annotations

import os
from pathlib import Path

from llamactl.errors import ConfigError

ENV_VAR = "LLAMACTL_HOME"


def llamactl_home() -> Path:
    """The root of everything llamactl writes outside a command's own destination."""
    home = os.environ.get(ENV_VAR)
    if not home:
        from platformdirs import user_data_dir

        home = user_data_dir("llamactl")
    path = Path(home).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: {ENV_VAR} points at a file; it must be a directory")
    return path


def models_home() -> Path:
    """The model store: one directory (or symlink, or GGUF file) per model name."""
    return llamactl_home() / "models"


def cache_dir(*parts: str) -> Path:
    """`$LLAMACTL_HOME/cache/...` (safe to delete: everything there is recomputed when missing)."""
    return llamactl_home().joinpath("cache", *parts)


def hash_cache_file() -> Path:
    return cache_dir("sha256.json")


def chat_history_file() -> Path:
    return llamactl_home() / "chat_history"
