"""What a checkpoint format is: how to recognise, read, plan and write it (registered through plugins)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llamactl.checkpoint.base import CheckpointReader
from llamactl.layout import TensorInfo


@dataclass
class WriteOptions:
    """What a writer may be asked for; a format ignores options that mean nothing to it."""

    dtype: str | None = None  # a float dtype short name; None keeps each tensor's dtype
    shards: int | None = None  # model-parallel shards (Meta); None keeps the source's
    max_shard_bytes: int = 5 * 10**9  # size-based sharding (HF)
    gguf_type: str | None = None  # GGUF: quantize the block projections (q8_0, q4_0)
    on_tensor: Callable[[str, int], None] | None = None  # progress: (name, bytes written)


# (file name, tensors it will hold) for every weights file a writer creates.
WritePlan = list[tuple[str, list[TensorInfo]]]


@dataclass(frozen=True)
class CheckpointFormat:
    """A format: how to recognise a directory, read it, and optionally plan and write one.

    `plan(reader, options)` lists the files and tensors without touching the disk (so
    `--dry-run` and validation happen before anything is written); `write(out_dir, reader,
    plan, options)` streams `reader.iter_tensors()` into `out_dir`. `schemes` names the
    quantization methods whose tensors the format stores as they are (empty: plain weights
    only, so a quantized source cannot be written to it). `file_suffix` is set by a format
    whose output is one file (GGUF: `.gguf`) rather than a directory; `write` then receives
    that file's (temporary) path instead of a directory.
    """

    name: str
    detect: Callable[[Path], bool]
    open: Callable[[Path], CheckpointReader]
    plan: Callable[[CheckpointReader, WriteOptions], WritePlan] | None = None
    write: Callable[[Path, CheckpointReader, WritePlan, WriteOptions], None] | None = None
    description: str = ""
    schemes: tuple[str, ...] = ()
    file_suffix: str | None = None
