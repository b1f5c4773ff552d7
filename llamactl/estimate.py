"""Memory formulas shared by `info` and `bench`: the KV cache and the weights per storage scheme.

Computed from shapes alone (no tensor is created), so `info` can tell what a 70B model needs
without reading it, and `bench` can check what it measured against the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from llamactl import dtypes, layout
from llamactl.config import ModelArgs
from llamactl.layout import Shape, TensorInfo


class StoredSize(Protocol):
    """Anything that knows the bytes one quantized [out, in] weight takes (a quantization scheme)."""

    name: str

    def stored_bytes(self, shape: Shape) -> int: ...


def kv_cache_bytes(args: ModelArgs, tokens: int, batch: int = 1, dtype: str = "fp16") -> int:
    """2 (K and V) x layers x KV heads x head dim x tokens x batch x bytes per element."""
    return 2 * args.n_layers * args.kv_heads * args.head_dim * tokens * batch * dtypes.itemsize(dtype)


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
