"""Checkpoint formats behind one reader protocol, and model names resolved to directories."""

from __future__ import annotations

import os
from pathlib import Path

from llamactl.checkpoint.base import CheckpointReader
from llamactl.checkpoint.formats import (
    FORMATS,
    CheckpointFormat,
    WriteOptions,
    WritePlan,
    get_format,
    load_plugin_formats,
    register_format,
)
from llamactl.checkpoint.sharding import TensorInfo
from llamactl.errors import CheckpointError, ModelNotFoundError

__all__ = [
    "FORMATS",
    "CheckpointFormat",
    "CheckpointReader",
    "TensorInfo",
    "WriteOptions",
    "WritePlan",
    "detect_format",
    "get_format",
    "list_model_names",
    "models_home",
    "open_checkpoint",
    "register_format",
    "resolve_model",
]


def _register_builtins() -> None:
    from llamactl.checkpoint import hf, meta

    register_format(
        CheckpointFormat(
            "meta",
            meta.detect_meta,
            meta.MetaReader.open,
            meta.plan_format,
            meta.write_format,
            "Meta: params.json + consolidated.NN.pth model-parallel shards",
        )
    )
    register_format(
        CheckpointFormat(
            "hf",
            hf.detect_hf,
            hf.HFReader.open,
            hf.plan_format,
            hf.write_format,
            "Hugging Face: config.json + safetensors shards + index",
        )
    )


_register_builtins()


def models_home() -> Path:
    """`$LLAMACTL_HOME/models`, by default in the user's data directory (XDG on Linux)."""
    home = os.environ.get("LLAMACTL_HOME")
    if not home:
        from platformdirs import user_data_dir

        home = user_data_dir("llamactl")
    return Path(home).expanduser() / "models"


def list_model_names() -> list[str]:
    root = models_home()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """A path to an existing directory, or a model name under models_home()."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path}: is a file; a model is a directory (params.json or config.json inside)")
    name = str(model)
    if "/" not in name and os.sep not in name:
        candidate = models_home() / name
        if candidate.is_dir():
            return candidate
        names = list_model_names()
        known = f"models in {models_home()}: {', '.join(names)}" if names else f"no models in {models_home()} yet"
        raise ModelNotFoundError(f"{name}: no such model directory or model name ({known})")
    raise ModelNotFoundError(f"{path}: no such directory")


def detect_format(path: Path) -> CheckpointFormat:
    """The first registered format that recognises `path` (plugins before built-ins)."""
    load_plugin_formats()
    for fmt in reversed(list(FORMATS.values())):
        if fmt.detect(path):
            return fmt
    raise CheckpointError(f"{path}: not a model directory (no params.json, config.json or other known checkpoint)")


def open_checkpoint(model: str | os.PathLike[str]) -> CheckpointReader:
    """Resolve a name or path, detect its format and open it (metadata only, no weights read)."""
    path = resolve_model(model)
    return detect_format(path).open(path)
