"""The registry of checkpoint formats: built-ins and plugins register the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llamactl.checkpoint.base import CheckpointReader
from llamactl.checkpoint.sharding import TensorInfo
from llamactl.errors import UsageError


@dataclass
class WriteOptions:
    """What a writer may be asked for; a format ignores options that mean nothing to it."""

    dtype: torch.dtype | None = None  # None keeps each tensor's dtype
    shards: int | None = None  # model-parallel shards (Meta); None keeps the source's
    max_shard_bytes: int = 5 * 10**9  # size-based sharding (HF)
    on_tensor: Callable[[str, int], None] | None = None  # progress: (name, bytes written)


# (file name, tensors it will hold) for every weights file a writer creates.
WritePlan = list[tuple[str, list[TensorInfo]]]


@dataclass(frozen=True)
class CheckpointFormat:
    """A format: how to recognise a directory, read it, and optionally plan and write one.

    `plan(reader, options)` lists the files and tensors without touching the disk (so
    `--dry-run` and validation happen before anything is written); `write(out_dir, reader,
    plan, options)` streams `reader.iter_tensors()` into `out_dir`.
    """

    name: str
    detect: Callable[[Path], bool]
    open: Callable[[Path], CheckpointReader]
    plan: Callable[[CheckpointReader, WriteOptions], WritePlan] | None = None
    write: Callable[[Path, CheckpointReader, WritePlan, WriteOptions], None] | None = None
    description: str = ""


FORMATS: dict[str, CheckpointFormat] = {}


def register_format(fmt: CheckpointFormat) -> None:
    """Add or replace a format (later registrations win, so plugins can override)."""
    FORMATS[fmt.name] = fmt


_plugins_loaded = False


def load_plugin_formats() -> None:
    """Pull in formats from installed plugins once, so library callers see them too."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        from llamactl.plugins import get_registry

        get_registry().formats()  # registers each plugin format here; broken plugins are reported by the CLI


def get_format(name: str) -> CheckpointFormat:
    load_plugin_formats()
    try:
        return FORMATS[name]
    except KeyError:
        raise UsageError(f"unknown format {name!r}; choose one of: {', '.join(sorted(FORMATS))}") from None


def writable_formats() -> list[str]:
    return sorted(name for name, fmt in FORMATS.items() if fmt.write is not None)
