"""Convert a checkpoint between formats and shard layouts, atomically.

`plan_convert` validates everything and lists what will be written without touching the
disk; `run_convert` writes into a temporary directory beside DST and renames it into place
only when complete, so a failure or Ctrl-C never leaves a half-written DST.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llamactl.checkpoint import CheckpointFormat, CheckpointReader, WriteOptions, WritePlan, get_format, open_checkpoint
from llamactl.errors import DestinationError, UsageError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}") from None


@dataclass
class ConvertPlan:
    """Everything a conversion will do, computed before any byte is written."""

    reader: CheckpointReader
    target: CheckpointFormat
    dst: Path
    files: WritePlan
    options: WriteOptions = field(default_factory=WriteOptions)

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data the writer produces (Meta replicates norms into every shard)."""
        return sum(info.nbytes for _, infos in self.files for info in infos)

    @property
    def tensor_count(self) -> int:
        return len(self.reader.tensor_infos())


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """DST may not be SRC, lie inside it or contain it; an existing DST needs force."""
    src_real, dst_real = src.resolve(), dst.resolve()
    if dst_real == src_real or src_real in dst_real.parents:
        raise DestinationError(f"{dst}: destination is inside the source {src}; choose a directory outside it")
    if dst_real in src_real.parents:
        raise DestinationError(f"{dst}: destination contains the source {src}; replacing it would delete the source")
    if dst.exists() and not force:
        raise DestinationError(f"{dst}: already exists (use --force to replace it)")
    if dst.exists() and not dst.is_dir():
        raise DestinationError(f"{dst}: exists and is not a directory")
    if not dst_real.parent.is_dir():
        raise DestinationError(f"{dst.parent}: parent directory does not exist")


def plan_convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    to: str,
    *,
    dtype: str | None = None,
    shards: int | None = None,
    max_shard_bytes: int | None = None,
    force: bool = False,
) -> ConvertPlan:
    """Open SRC, validate the request and return the plan (nothing is written)."""
    target = get_format(to)
    if target.plan is None or target.write is None:
        raise UsageError(f"format {to!r} cannot be written")
    if shards is not None and to != "meta":
        raise UsageError("--shards applies to --to meta (model-parallel shards); use --max-shard-size for hf")
    reader = open_checkpoint(src)
    dst_path = Path(dst).expanduser()
    check_destination(reader.path, dst_path, force)
    options = WriteOptions(dtype=parse_dtype(dtype), shards=shards)
    if max_shard_bytes is not None:
        options.max_shard_bytes = max_shard_bytes
    return ConvertPlan(reader, target, dst_path, target.plan(reader, options), options)


def run_convert(plan: ConvertPlan, on_tensor: Callable[[str, int], None] | None = None) -> Path:
    """Write the plan into a temporary directory beside DST, then move it into place."""
    dst = plan.dst
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.resolve().parent))
    try:
        plan.options.on_tensor = on_tensor
        assert plan.target.write is not None
        plan.target.write(tmp, plan.reader, plan.files, plan.options)
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, dst)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise DestinationError(f"{dst}: no space left on device while writing; nothing was written") from None
        raise DestinationError(f"{exc.filename or dst}: {exc.strerror or exc}; nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _replace_dir(tmp: Path, dst: Path) -> None:
    """Rename tmp to dst; an existing dst (allowed by --force) is removed only after."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except OSError:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str, **kwargs: object) -> Path:
    """Library one-call form: plan and run (see plan_convert for the options)."""
    plan = plan_convert(src, dst, to, **kwargs)  # type: ignore[arg-type]
    return run_convert(plan)
