"""Convert a checkpoint between formats and shard layouts, atomically.

`plan_convert` validates everything and lists what will be written without touching the
disk; `run_convert` writes into a temporary directory beside DST and renames it into place
only when complete, so a failure or Ctrl-C never leaves a half-written DST.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llamactl.atomic import atomic_directory, check_destination
from llamactl.checkpoint import CheckpointFormat, CheckpointReader, WriteOptions, WritePlan, get_format, open_checkpoint
from llamactl.dtypes import parse_float_dtype, to_torch
from llamactl.errors import UsageError


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
    name = parse_float_dtype(dtype)
    options = WriteOptions(dtype=to_torch(name) if name else None, shards=shards)
    if max_shard_bytes is not None:
        options.max_shard_bytes = max_shard_bytes
    return ConvertPlan(reader, target, dst_path, target.plan(reader, options), options)


def run_convert(plan: ConvertPlan, on_tensor: Callable[[str, int], None] | None = None) -> Path:
    """Write the plan into a temporary directory beside DST, then move it into place."""
    assert plan.target.write is not None
    plan.options.on_tensor = on_tensor
    with atomic_directory(plan.dst) as tmp:
        plan.target.write(tmp, plan.reader, plan.files, plan.options)
    return plan.dst


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str, **kwargs: object) -> Path:
    """Library one-call form: plan and run (see plan_convert for the options)."""
    plan = plan_convert(src, dst, to, **kwargs)  # type: ignore[arg-type]
    return run_convert(plan)
