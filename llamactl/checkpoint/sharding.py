"""Which tensor splits on which dim across model-parallel shards, and size-based shard plans.

One table serves both merge and split (Meta's model.py: ColumnParallelLinear splits the
output dim 0, RowParallelLinear and ParallelEmbedding the input dim 1; norms replicate).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llamactl.config import ModelArgs
from llamactl.errors import UsageError

_COLUMN_PARALLEL = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "feed_forward.w1.weight",
    "feed_forward.w3.weight",
)
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of a tensor, known before its bytes are read."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def split_dim(meta_name: str) -> int | None:
    """Model-parallel dim of a Meta tensor: 0 column-parallel, 1 row-parallel, None replicated."""
    if meta_name == "output.weight" or meta_name.endswith(_COLUMN_PARALLEL):
        return 0
    if meta_name == "tok_embeddings.weight" or meta_name.endswith(_ROW_PARALLEL):
        return 1
    return None


def merge_shards(meta_name: str, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """Join the model-parallel pieces of one tensor (replicated tensors take the first)."""
    dim = split_dim(meta_name)
    if dim is None or len(pieces) == 1:
        return pieces[0]
    return torch.cat(list(pieces), dim=dim)


def split_tensor(meta_name: str, tensor: torch.Tensor, shards: int) -> list[torch.Tensor]:
    """Cut one full tensor into `shards` model-parallel pieces."""
    dim = split_dim(meta_name)
    if dim is None:
        return [tensor] * shards
    return list(torch.chunk(tensor, shards, dim=dim))


def shard_shape(meta_name: str, shape: tuple[int, ...], shards: int) -> tuple[int, ...]:
    dim = split_dim(meta_name)
    if dim is None:
        return shape
    out = list(shape)
    out[dim] //= shards
    return tuple(out)


def check_splittable(args: ModelArgs, infos: Sequence[TensorInfo], shards: int) -> None:
    """Refuse a model-parallel count that does not divide heads and every split dim."""
    if shards < 1:
        raise UsageError(f"--shards must be at least 1, got {shards}")
    for what, value in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads)):
        if value % shards:
            raise UsageError(
                f"cannot split into {shards} model-parallel shards: {what} {value} is not divisible by {shards}"
            )
    for info in infos:
        dim = split_dim(info.name)
        if dim is not None and info.shape[dim] % shards:
            raise UsageError(f"cannot split {info.name} {list(info.shape)} into {shards} shards along dim {dim}")


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every Meta tensor of this shape with its full (merged) shape, in Meta's order."""
    d, hd, kv = args.dim, args.head_dim, args.kv_heads * args.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings.weight": (args.vocab_size, d),
        "norm.weight": (d,),
        "output.weight": (args.vocab_size, d),
    }
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (kv, d),
            p + "attention.wv.weight": (kv, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (args.hidden_dim, d),
            p + "feed_forward.w2.weight": (d, args.hidden_dim),
            p + "feed_forward.w3.weight": (args.hidden_dim, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        }
    return shapes


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
