"""Bindings of the quantized matvec kernels (matvec_kernels.cpp): GGUF Q4_0 / Q8_0 weights times
a few activation rows, with activations quantized per 32-value block to int8 (as llama.cpp does).

`repack` turns a weight's blocks into the kernels' row-interleaved layout (same bytes, 16 rows
per group, see the .cpp), `dequantize` gives rows of it back in a float dtype (for a long
prefill's dense matmul), `matvec` runs it. Built only where the compiler targets AVX512-VNNI
(`available`); callers keep torch's kernels elsewhere. `matvec_dense` runs plain bf16 / fp32
weights (row-major, as torch holds them) the same way, for one-row products (`GemvLinear`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llamactl.cpu.build import SUFFIX, function, threads

GROUP_ROWS = 16  # weight rows interleaved in one group: one zmm lane each
BLOCK = 32  # values per block (Q4_0 / Q8_0): in features must be a multiple
_V, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
_FOUND: dict[str, Callable[..., None] | None] = {}


def _kernel(name: str, argtypes: list[type]) -> Callable[..., None] | None:
    if name not in _FOUND:
        _FOUND[name] = function(name, argtypes)
    return _FOUND[name]


def _quantized(bits: int, x_dtype: torch.dtype, y_dtype: torch.dtype) -> Callable[..., None] | None:
    # (payload, scales, x, y, M, N, K, threads)
    name = f"matvec_q{bits}_{SUFFIX.get(x_dtype)}_{SUFFIX.get(y_dtype)}"
    return _kernel(name, [_V, _V, _V, _V, _L, _L, _L, _I])


def _dense(w_dtype: torch.dtype, y_dtype: torch.dtype) -> Callable[..., None] | None:
    # (weight, x, y, M, N, K, threads): bf16 weights (bf16 or fp32 out), fp32 weights (fp32 out)
    return _kernel(f"matvec_{SUFFIX.get(w_dtype)}_{SUFFIX.get(y_dtype)}", [_V, _V, _V, _L, _L, _L, _I])


DENSE_DTYPES = (torch.bfloat16, torch.float32)  # weight dtypes with a dense matvec kernel


def dense_available(dtype: torch.dtype) -> bool:
    """Whether this machine's build has the dense matvec for `dtype` weights (bf16: AVX512-BF16;
    fp32: AVX512F)."""
    return dtype in DENSE_DTYPES and _dense(dtype, dtype) is not None


def matvec_dense(weight: torch.Tensor, x: torch.Tensor, y_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] @ weight.T -> [M, N] for a contiguous bf16 or fp32 weight [N, K] and x of its dtype,
    accumulated in fp32 (vdpbf16ps / FMA); bf16 weights may give fp32 out (y_dtype)."""
    want = torch.float32 if y_dtype == torch.float32 else weight.dtype
    fn = _dense(weight.dtype, want)
    if fn is None:
        raise RuntimeError(f"no {weight.dtype} matvec kernel on this machine")
    n, k = int(weight.shape[0]), int(weight.shape[1])
    y = torch.empty(x.shape[0], n, dtype=want)
    fn(weight.data_ptr(), x.data_ptr(), y.data_ptr(), x.shape[0], n, k, threads())
    return y


class BoundDenseMatvec:
    """`matvec_dense` for one weight with its lookups done once (see BoundMatvec); holds the
    weight's storage as it was bound."""

    def __init__(self, weight: torch.Tensor) -> None:
        if not dense_available(weight.dtype):
            raise RuntimeError(f"no {weight.dtype} matvec kernel on this machine")
        if not weight.is_contiguous():
            raise ValueError("the dense matvec reads a contiguous weight")
        self._held = weight.detach()
        self.n, self.k, self.x_dtype = int(weight.shape[0]), int(weight.shape[1]), weight.dtype

    def raw(self, y_dtype: torch.dtype) -> Callable[[int, int, int, int], None]:
        """The kernel itself, `(x_ptr, y_ptr, rows, threads) -> None` (as BoundMatvec.raw)."""
        fn, w, n, k = _dense(self.x_dtype, y_dtype), self._held.data_ptr(), self.n, self.k
        assert fn is not None
        return lambda x_ptr, y_ptr, rows, threads: fn(w, x_ptr, y_ptr, rows, n, k, threads)


def available(bits: int, dtype: torch.dtype) -> bool:
    """Whether this machine's build has the kernel for `bits`-bit blocks and `dtype` activations."""
    return _quantized(bits, dtype, dtype) is not None


def matvec(
    bits: int, payload: torch.Tensor, scales: torch.Tensor, n: int, x: torch.Tensor, y_dtype: torch.dtype
) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] (in fp32 if y_dtype is, else in x's dtype) for `repack`'s (payload, scales)
    of a weight of N rows; contiguous CPU tensors only."""
    return BoundMatvec(bits, payload, scales, n, x.dtype)(x, y_dtype)


class BoundMatvec:
    """`matvec` for one weight and activation dtype with its lookups done once: a decode step
    calls it ~50 times a token, where a few microseconds of Python each add up. Keeps the
    weight's tensors alive."""

    def __init__(self, bits: int, payload: torch.Tensor, scales: torch.Tensor, n: int, x_dtype: torch.dtype) -> None:
        fns = {want: _quantized(bits, x_dtype, want) for want in {x_dtype, torch.float32}}
        if None in fns.values():
            raise RuntimeError(f"no q{bits} matvec kernel for {x_dtype} on this machine")
        self._fns: dict[torch.dtype, Callable[..., None]] = fns  # type: ignore[assignment]
        self._held = (payload, scales)
        self._w, self._s = payload.data_ptr(), scales.data_ptr()
        self.n, self.k, self.x_dtype = n, int(scales.shape[1]) * BLOCK, x_dtype

    def __call__(self, x: torch.Tensor, y_dtype: torch.dtype) -> torch.Tensor:
        """x [M, K] (contiguous, x_dtype) -> [M, N] in fp32 if y_dtype is, else in x_dtype."""
        assert x.dtype == self.x_dtype and x.shape[1] == self.k
        want = y_dtype if y_dtype in self._fns else self.x_dtype
        y = torch.empty(x.shape[0], self.n, dtype=want)
        self._fns[want](self._w, self._s, x.data_ptr(), y.data_ptr(), x.shape[0], self.n, self.k, threads())
        return y

    def raw(self, y_dtype: torch.dtype) -> Callable[[int, int, int, int], None]:
        """The kernel itself, `(x_ptr, y_ptr, rows, threads) -> None`, for a caller that owns the
        buffers: x [rows, K] contiguous in x_dtype, y [rows, N] contiguous in y_dtype (x_dtype or
        fp32). Nothing is checked; the caller keeps this object alive."""
        fn, w, s, n, k = self._fns[y_dtype], self._w, self._s, self.n, self.k
        return lambda x_ptr, y_ptr, rows, threads: fn(w, s, x_ptr, y_ptr, rows, n, k, threads)


def repack(d: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(payload, scales) in the kernels' layout from fp16 block scales d [N, K/32] and block values
    [N, K/32, 32] (Q8_0: int8 q; Q4_0: uint8 u in 0..15, the value u - 8). Rows pad to 16 with
    zero scales.

    payload: Q8_0 [N/16, K/4, 16, 4] int8, Q4_0 [N/16, K/8, 16, 4] bytes (values 8s+i low nibble,
    8s+4+i high); scales [N/16, K/32, 16] fp16.
    """
    n, blocks = int(d.shape[0]), int(d.shape[1])
    k, pad = blocks * BLOCK, -int(d.shape[0]) % GROUP_ROWS
    groups = (n + pad) // GROUP_ROWS
    scales = F.pad(d, (0, 0, 0, pad)).view(groups, GROUP_ROWS, blocks).permute(0, 2, 1).contiguous()
    v = F.pad(values.reshape(n, k).view(torch.uint8), (0, 0, 0, pad))
    if values.dtype == torch.int8:  # Q8_0
        payload = v.view(groups, GROUP_ROWS, k // 4, 4).permute(0, 2, 1, 3).contiguous()
    else:
        pairs = v.view(n + pad, k // 8, 2, 4)
        payload = pairs[:, :, 0] | (pairs[:, :, 1] << 4)
        payload = payload.view(groups, GROUP_ROWS, k // 8, 4).permute(0, 2, 1, 3).contiguous()
    return payload, scales


def _dequantizer(bits: int, dtype: torch.dtype) -> Callable[..., None] | None:
    # (payload, scales, out, groups, K, threads)
    return _kernel(f"dequantize_q{bits}_{SUFFIX.get(dtype)}", [_V, _V, _V, _L, _L, _I])


def native_dequantize_available(bits: int, dtype: torch.dtype) -> bool:
    """Whether `dequantize` runs the native kernel for q`bits` into `dtype` here (AVX512-VNNI builds)."""
    return _dequantizer(bits, dtype) is not None


def dequantize(payload: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """W [groups * 16, K] in `dtype` from (a slice of groups of) `repack`'s layout: round(q * d), q the
    block's integer values, d its fp16 scale cast to `dtype`. The native kernel where built (one pass:
    a 4096x768 weight in bf16 ~8x faster than torch's unpack, permute and multiply), else torch."""
    fn = _dequantizer(bits, dtype)
    if fn is None or not (payload.is_contiguous() and scales.is_contiguous()) or payload.device.type != "cpu":
        return dequantize_torch(payload, scales, bits, dtype)
    groups, k = int(scales.shape[0]), int(scales.shape[1]) * BLOCK
    out = torch.empty(groups * GROUP_ROWS, k, dtype=dtype)
    fn(payload.data_ptr(), scales.data_ptr(), out.data_ptr(), groups, k, threads())
    return out


def dequantize_torch(payload: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize` in torch operators (any machine; the reference the native kernel matches)."""
    groups, blocks = int(scales.shape[0]), int(scales.shape[1])
    rows, k = groups * GROUP_ROWS, blocks * BLOCK
    if bits == 8:
        q = payload.view(torch.int8).permute(0, 2, 1, 3).reshape(rows, blocks, BLOCK)
    else:
        u = torch.stack([payload & 0x0F, payload >> 4], dim=2)  # [groups, K/8, 2, 16, 4]
        q = u.permute(0, 3, 1, 2, 4).reshape(rows, blocks, BLOCK).view(torch.int8).sub_(8)
    d = scales.permute(0, 2, 1).reshape(rows, blocks, 1).to(dtype)
    return torch.mul(q, d).view(rows, k)
