"""Model-parallel split and merge by the layout table, and size-based shard plans.

Which dim a tensor splits on is a fact of `llamactl.layout` (Meta's model.py:
ColumnParallelLinear splits dim 0, RowParallelLinear and ParallelEmbedding dim 1, norms are
replicated); this module applies it to tensors and shapes, for both merge and split.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from llamactl.config import ModelArgs
from llamactl.errors import UsageError
from llamactl.layout import Shape, TensorInfo, split_dim

if TYPE_CHECKING:
    import torch


def merge_shards(meta_name: str, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """Join the model-parallel pieces of one tensor (replicated tensors take the first)."""
    dim = split_dim(meta_name)
    if dim is None or len(pieces) == 1:
        return pieces[0]
    import torch

    return torch.cat(list(pieces), dim=dim)


def split_tensor(meta_name: str, tensor: torch.Tensor, shards: int) -> list[torch.Tensor]:
    """Cut one full tensor into `shards` model-parallel pieces (views, no copy)."""
    dim = split_dim(meta_name)
    if dim is None:
        return [tensor] * shards
    return list(tensor.chunk(shards, dim=dim))


def shard_shape(meta_name: str, shape: Shape, shards: int) -> Shape:
    dim = split_dim(meta_name)
    if dim is None:
        return shape
    out = list(shape)
    out[dim] //= shards
    return tuple(out)


def check_splittable(args: ModelArgs, infos: Sequence[TensorInfo], shards: int) -> None:
    """Refuse a model-parallel count that does not divide heads and every split dim."""
    if shards < 1:
        raise UsageError(f"shards must be at least 1, got {shards}")
    for what, value in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads)):
        if value % shards:
            raise UsageError(
                f"cannot split into {shards} model-parallel shards: {what} {value} is not divisible by {shards}"
            )
    for info in infos:
        dim = split_dim(info.name)
        if dim is not None and info.shape[dim] % shards:
            raise UsageError(f"cannot split {info.name} {list(info.shape)} into {shards} shards along dim {dim}")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as transformers uses; KiB/MiB/GiB binary)."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"invalid size {text!r}; use e.g. 500MB, 5GB or 2GiB")
    value, unit = float(match.group(1)), (match.group(2) or "B").upper()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"size must be positive, got {text!r}")
    return size


def plan_size_shards(infos: Sequence[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    """Greedy in-order packing into files of at most max_bytes (a bigger tensor gets its own)."""
    files: list[list[TensorInfo]] = [[]]
    used = 0
    for info in infos:
        if files[-1] and used + info.nbytes > max_bytes:
            files.append([])
            used = 0
        files[-1].append(info)
        used += info.nbytes
    return files
