"""Memory formulas shared by `info` and `bench`: the KV cache and the weights per storage scheme.

Computed from shapes alone (no tensor is created), so `info` can tell what a 70B model needs
without reading it, and `bench` can check what it measured against the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from llamactl import dtypes, layout
from llamactl.config import ModelArgs
from llamactl.errors import UsageError
from llamactl.layout import Shape, TensorInfo


class StoredSize(Protocol):
    """Anything that knows the bytes one quantized [out, in] weight takes (a quantization scheme)."""

    name: str

    def stored_bytes(self, shape: Shape) -> int: ...


def kv_cache_bytes(args: ModelArgs, tokens: int, batch: int = 1, dtype: str = "fp16", tp: int = 1) -> int:
    """2 (K and V) x layers x KV heads x head dim x tokens x batch x bytes per element.

    `tp`: one tensor-parallel rank's cache, which holds n_kv_heads / tp of the KV heads.
    """
    return 2 * args.n_layers * (args.kv_heads // tp) * args.head_dim * tokens * batch * dtypes.itemsize(dtype)


def rank_infos(infos: Iterable[TensorInfo], tp: int) -> list[TensorInfo]:
    """What one of `tp` tensor-parallel ranks holds: every split tensor cut on its split dim."""
    out = []
    for info in infos:
        dim = layout.split_dim(info.name)
        shape = list(info.shape)
        if dim is not None and tp > 1:
            shape[dim] //= tp
        out.append(TensorInfo(info.name, tuple(shape), info.dtype))
    return out


def check_tp(args: ModelArgs, tp: int) -> None:
    """`--tp` must divide the heads, the KV heads and every split dim (dim, FFN, vocab)."""
    if tp < 1:
        raise UsageError(f"--tp {tp}: must be at least 1")
    sizes = (
        ("n_heads", args.n_heads),
        ("n_kv_heads", args.kv_heads),
        ("dim", args.dim),
        ("hidden_dim", args.hidden_dim),
        ("vocab_size", args.vocab_size),
    )
    for what, value in sizes:
        if value % tp:
            raise UsageError(f"--tp {tp}: {what} {value} is not divisible by {tp}; choose a --tp that divides it")


def tp_choices(args: ModelArgs, limit: int = 64) -> list[int]:
    """The --tp values a shape allows: those dividing heads, KV heads and every split dim."""
    sizes = (args.n_heads, args.kv_heads, args.dim, args.hidden_dim, args.vocab_size)
    return [n for n in range(1, limit + 1) if all(size % n == 0 for size in sizes)]


# What a GPU offers a model: its memory less what CUDA, the allocator and activations take.
GPU_HEADROOM = 0.9


def smallest_tp(per_rank_bytes: Callable[[int], int], choices: Iterable[int], gpu_bytes: int) -> int | None:
    """The fewest ranks whose per-rank need fits `gpu_bytes` (with headroom); None when none does."""
    for tp in choices:
        if per_rank_bytes(tp) <= gpu_bytes * GPU_HEADROOM:
            return tp
    return None


def weight_bytes(infos: Iterable[TensorInfo], scheme: StoredSize | None = None, dtype: str = "fp16") -> int:
    """Bytes of the weights held at `dtype`, with the block projections stored by `scheme` when given."""
    size = dtypes.itemsize(dtype)
    total = 0
    for info in infos:
        if scheme is not None and layout.is_quantizable(info.name):
            total += scheme.stored_bytes(info.shape)
        else:
            total += info.numel * size
    return total


def shape_infos(args: ModelArgs, dtype: str = "fp16") -> list[TensorInfo]:
    """The tensor infos a checkpoint of this shape has (for estimates without a checkpoint)."""
    return [TensorInfo(name, shape, dtype) for name, shape in layout.expected_shapes(args).items()]
