"""Checkpoint formats behind one reader protocol, and model names resolved to directories."""

from __future__ import annotations

import os
from pathlib import Path

from llamactl.checkpoint.base import CheckpointReader
from llamactl.checkpoint.formats import CheckpointFormat, WriteOptions, WritePlan
from llamactl.errors import CheckpointError, ModelNotFoundError, UsageError
from llamactl.home import models_home
from llamactl.layout import TensorInfo
from llamactl.plugins import get_registry
from llamactl.sources import locate, sources

__all__ = [
    "CheckpointFormat",
    "CheckpointReader",
    "TensorInfo",
    "WriteOptions",
    "WritePlan",
    "detect_format",
    "formats",
    "get_format",
    "list_model_names",
    "open_checkpoint",
    "resolve_model",
]


def formats() -> dict[str, CheckpointFormat]:
    """Every registered format by name: llamactl's own and those of installed plugins."""
    return get_registry().formats()


def get_format(name: str) -> CheckpointFormat:
    table = formats()
    try:
        return table[name]
    except KeyError:
        raise UsageError(f"unknown format {name!r}; choose one of: {', '.join(sorted(table))}") from None


def list_model_names() -> list[str]:
    root = models_home()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """A path to an existing directory or `.gguf` file, or a model name under models_home()."""
    path = Path(model).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".gguf"):
        return path
    if path.exists():
        raise ModelNotFoundError(
            f"{path}: is a file; a model is a directory (params.json or config.json inside) or a .gguf file"
        )
    name = str(model)
    if "/" not in name and os.sep not in name:
        candidate = models_home() / name
        if candidate.is_dir():
            return candidate
        source = sources().get(name)
        if source is not None:  # a model an installed package ships (the store's own names win)
            found = locate(source)
            if found is None:
                raise ModelNotFoundError(f"{name}: {source.description}, which is not installed: {source.install_hint}")
            return found
        names = list_model_names()
        known = f"models in {models_home()}: {', '.join(names)}" if names else f"no models in {models_home()} yet"
        raise ModelNotFoundError(f"{name}: no such model directory or model name ({known})")
    raise ModelNotFoundError(f"{path}: no such directory")


def detect_format(path: Path) -> CheckpointFormat:
    """The first registered format that recognises `path` (plugins before built-ins)."""
    registry = get_registry()
    for fmt in reversed(list(registry.formats().values())):
        if registry.call_isolated("register_formats", fmt.name, fmt.detect, path):
            return fmt
    raise CheckpointError(
        f"{path}: not a model directory (no params.json, config.json, .gguf file or other known checkpoint)"
    )


def open_checkpoint(model: str | os.PathLike[str]) -> CheckpointReader:
    """Resolve a name or path, detect its format and open it (metadata only, no weights read)."""
    path = resolve_model(model)
    return detect_format(path).open(path)
