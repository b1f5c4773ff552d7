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


def model_files(path: Path) -> list[Path]:
    """Every regular file of a model directory (following a linked import), hidden ones excluded.

    THE definition of what a model occupies on disk: `list`, `show`, `info` and `rm` all count these.
    """
    root = path.resolve()
    if root.is_file():  # a .gguf given by path
        return [root]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # Regular files only: a FIFO or a link to /dev/zero would block hashing forever.
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and (Path(dirpath) / f).is_file()]
    return out


def disk_bytes(files: list[Path]) -> int:
    """Bytes the files occupy (their sizes, as `ls -l` and every report of llamactl give them)."""
    return sum(f.stat().st_size for f in files)
