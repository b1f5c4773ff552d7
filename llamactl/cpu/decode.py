"""Bindings of the one-token decode kernels (decode_kernels.cpp) for `engine.fused_cpu`."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llamactl.cpu.build import SUFFIX, function

MAX_HEAD_DIM = 512  # attend's accumulator (decode_kernels.cpp)
_V, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
_SIGNATURES = {
    "rms_norm": [_V, _V, _V, _V, _V, _I, _F],
    "rope_store": [_V, _V, _V, _V, _L, _I, _I, _I, _L],
    "attend": [_V, _V, _V, _L, _I, _I, _I, _L, _V, _V, _I],
    "silu_mul": [_V, _V, _L],
}
DTYPES = tuple(SUFFIX)  # activation dtypes the kernels are built for (fp16 where the compiler has it)


@dataclass(frozen=True)
class Kernels:
    """The four kernels for one activation dtype (signatures: decode_kernels.cpp)."""

    rms_norm: Callable[..., None]
    rope_store: Callable[..., None]
    attend: Callable[..., None]
    silu_mul: Callable[..., None]


def kernels(dtype: torch.dtype) -> Kernels | None:
    """The kernels for activations of `dtype`, or None (unbuilt, or no build of that dtype here)."""
    suffix = SUFFIX.get(dtype)
    if suffix is None:
        return None
    found = {name: function(f"{name}_{suffix}", argtypes) for name, argtypes in _SIGNATURES.items()}
    return None if None in found.values() else Kernels(**found)
