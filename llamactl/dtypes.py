"""THE dtype table: every element type llamactl names, with its spelling in each ecosystem.

Metadata (tensor infos, plans, `info`, `list`) carries dtypes as llamactl's short names
(`"bf16"`), so reading a checkpoint's shapes never needs torch; `to_torch` turns a name into
a `torch.dtype` where tensors are actually touched.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llamactl.errors import MissingDependencyError, UsageError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """One element type. `hf` is transformers' `torch_dtype` spelling; `gguf` a GGMLQuantizationType."""

    name: str  # llamactl's short name (what --dtype takes for floats)
    torch: str  # attribute of the torch module
    safetensors: str
    itemsize: int
    floating: bool
    gguf: int | None = None

    @property
    def hf(self) -> str:
        return self.torch


DTYPE_TABLE: tuple[DType, ...] = (
    DType("fp32", "float32", "F32", 4, True, gguf=0),
    DType("fp16", "float16", "F16", 2, True, gguf=1),
    DType("bf16", "bfloat16", "BF16", 2, True, gguf=30),
    DType("fp64", "float64", "F64", 8, True, gguf=28),
    DType("int8", "int8", "I8", 1, False, gguf=24),
    DType("int16", "int16", "I16", 2, False, gguf=25),
    DType("int32", "int32", "I32", 4, False, gguf=26),
    DType("int64", "int64", "I64", 8, False, gguf=27),
    DType("uint8", "uint8", "U8", 1, False),
    DType("bool", "bool", "BOOL", 1, False),
)

# The floating types a model computes in and every command's --dtype accepts.
FLOAT_NAMES: tuple[str, ...] = ("fp32", "fp16", "bf16")

_BY_ANY: dict[str, DType] = {}
for _d in DTYPE_TABLE:
    for _key in (_d.name, _d.torch, _d.safetensors, f"torch.{_d.torch}"):
        _BY_ANY.setdefault(_key.lower(), _d)
_BY_ANY |= {"float": _BY_ANY["fp32"], "half": _BY_ANY["fp16"]}


def lookup(dtype: str | Any) -> DType:
    """The table row for a short name, torch name, safetensors name or a `torch.dtype`."""
    key = str(dtype).lower()
    try:
        return _BY_ANY[key]
    except KeyError:
        raise UsageError(f"unknown dtype {str(dtype)!r}; known: {', '.join(d.name for d in DTYPE_TABLE)}") from None


def name_of(dtype: str | Any) -> str:
    """Short name of any spelling: torch.bfloat16 -> 'bf16'."""
    return lookup(dtype).name


def parse_float_dtype(name: str | None) -> str | None:
    """A compute dtype chosen by the user ('bf16', 'bfloat16'...); None stays None (automatic)."""
    if name is None:
        return None
    row = _BY_ANY.get(name.lower())
    if row is None or row.name not in FLOAT_NAMES:
        raise UsageError(f"dtype {name!r}: choose one of {', '.join(FLOAT_NAMES)}")
    return row.name


def itemsize(dtype: str | Any) -> int:
    return lookup(dtype).itemsize


MIN_TORCH = (2, 10)


def to_torch(dtype: str | Any) -> torch.dtype:
    """The torch.dtype for any spelling (torch is imported here, not by metadata code)."""
    import torch

    _check_torch(torch.__version__)
    return getattr(torch, lookup(dtype).torch)


@functools.cache
def _check_torch(version: str) -> None:
    """pip can be bypassed: refuse a torch older than the one pyproject.toml asks for."""
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if numbers < MIN_TORCH:
        raise MissingDependencyError(
            f"torch {version} is too old: llamactl needs torch >= {'.'.join(map(str, MIN_TORCH))} "
            "(older releases let a crafted checkpoint run code); upgrade torch"
        )
