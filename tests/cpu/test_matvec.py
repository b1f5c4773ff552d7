"""The native matvec kernels (llamactl/cpu/matvec_kernels.cpp) against independent references:
gguf-py's quantizers and dequantizers for the weights and for llama.cpp's 8-bit activations,
torch's fp32 matmul for bf16."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llamactl.cpu import build, matvec
from llamactl.quantize.native import _split
from llamactl.quantize.spec import QuantSpec

GGML = {4: gguf.GGMLQuantizationType.Q4_0, 8: gguf.GGMLQuantizationType.Q8_0}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _need(bits: int) -> None:
    if not matvec.available(bits, torch.bfloat16):
        pytest.skip("no AVX512-VNNI build of the matvec kernels on this CPU (or no compiler)")


def _blocks(rows: int, cols: int, bits: int, seed: int) -> np.ndarray:
    w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05).numpy()
    w[0, :32] = 0  # a zero block
    w[1, 5] = 3.0  # an outlier
    return gguf.quants.quantize(w, GGML[bits])


def _reference(blocks: np.ndarray, bits: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y [M, N] in float64, the sum of |terms| per output): the gguf-dequantized weights times
    x quantized as llama.cpp quantizes activations (gguf-py's Q8_0 rule; scale d = amax / 127 in fp32)."""
    w = gguf.quants.dequantize(blocks, GGML[bits]).astype(np.float64)  # [N, K]
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32).astype(np.float32)
    q = gguf.quants.quantize(x.astype(np.float32), GGML[8]).reshape(m, k // 32, 34)[..., 2:].view(np.int8)
    d = np.abs(xb).max(-1, keepdims=True) / np.float32(127)
    xq = (q.astype(np.float64) * d.astype(np.float64)).reshape(m, k)
    return xq @ w.T, np.abs(xq) @ np.abs(w).T


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols"), [(40, 96), (16, 256), (3, 64)])
def test_quantized_matvec_is_llama_cpps_arithmetic(bits: int, dtype: torch.dtype, rows: int, cols: int) -> None:
    """Int8 block products of the weights and 8-bit activations, exactly, then fp32 scaling:
    within fp32 rounding of the float64 reference. Rows not a multiple of 16 (padded groups),
    inputs not a multiple of 64 or 128, one and several activation rows, every output dtype."""
    _need(bits)
    if not matvec.available(bits, dtype):
        pytest.skip(f"no {dtype} build here (the compiler lacks _Float16 conversions)")
    blocks = _blocks(rows, cols, bits, seed=rows + cols)
    packed = torch.from_numpy(blocks.reshape(rows, -1).copy())
    payload, scales = matvec.repack(*_split(packed, QuantSpec(f"q{bits}")))
    for m in (1, 5):
        x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m)).to(dtype)
        want, size = _reference(blocks, bits, x.float().numpy())
        for out in (dtype, torch.float32):
            got = matvec.matvec(bits, payload, scales, rows, x, out)
            assert got.shape == (m, rows) and got.dtype == out
            rounding = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}[out]
            err = np.abs(got.double().numpy() - want)
            assert (err <= rounding * np.abs(want) + 1e-5 * size).all(), err.max()


def _native_dequantize(bits: int) -> None:
    if not matvec.native_dequantize_available(bits, torch.float32):
        pytest.skip("no AVX512-VNNI build of the dequantize kernels on this CPU (or no compiler)")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("impl", ["native", "torch"])
def test_repack_round_trips_to_ggufs_values(bits: int, impl: str) -> None:
    """`dequantize` (the native kernel, and torch's fallback) of the interleaved layout gives gguf-py's
    dequantized rows (padding rows 0)."""
    if impl == "native":
        _native_dequantize(bits)
    dequantize = matvec.dequantize if impl == "native" else matvec.dequantize_torch
    blocks = _blocks(40, 128, bits, seed=3)
    payload, scales = matvec.repack(*_split(torch.from_numpy(blocks.copy()), QuantSpec(f"q{bits}")))
    assert payload.nbytes + scales.nbytes == blocks.nbytes * 48 // 40  # the file's bytes, 40 rows padded to 48
    values = dequantize(payload, scales, bits, torch.float32)
    assert values.shape == (48, 128)
    assert torch.equal(values[:40], torch.from_numpy(gguf.quants.dequantize(blocks, GGML[bits])))
    assert not values[40:].any()
    part = dequantize(payload[1:2], scales[1:2], bits, torch.float32)  # one group of 16 rows
    assert torch.equal(part, values[16:32])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_dequantize_rounds_as_torch(bits: int, dtype: torch.dtype) -> None:
    """In 16 bits the native kernel gives torch's round(q * d.to(dtype)) bit for bit (the prefill's
    dense matmul then reads the same weights either way), NaN and infinite scales included."""
    _native_dequantize(bits)
    blocks = _blocks(64, 256, bits, seed=6)
    d, values = _split(torch.from_numpy(blocks.copy()), QuantSpec(f"q{bits}"))
    d = d.clone()
    d[2, 0], d[3, 1], d[4, 2] = float("nan"), float("inf"), 6.0e4  # and one whose products overflow fp16
    payload, scales = matvec.repack(d, values)
    got = matvec.dequantize(payload, scales, bits, dtype)
    want = matvec.dequantize_torch(payload, scales, bits, dtype)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("dtype", matvec.DENSE_DTYPES)
def test_dense_matvec_is_the_fp32_product_of_the_values(dtype: torch.dtype) -> None:
    if not matvec.dense_available(dtype):
        pytest.skip(f"no {dtype} build of the dense matvec on this CPU (AVX512-BF16 / AVX512F; or no compiler)")
    g = torch.Generator().manual_seed(4)
    # inputs past a multiple of the 2 x 16 / 2 x 32 unrolled step, shorter than one block; any row count
    for n, k in ((42, 100), (8, 32), (5, 7), (3, 200)):
        w = torch.randn(n, k, generator=g).to(dtype)
        x = torch.randn(3, k, generator=g).to(dtype)
        want = x.double() @ w.double().t()
        got32 = matvec.matvec_dense(w, x, torch.float32)
        assert got32.dtype == torch.float32
        torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)
        got = matvec.matvec_dense(w, x)
        assert got.dtype == dtype and torch.equal(got, got32.to(dtype))  # rounded once, as torch


def test_the_kernels_run_on_torchs_threads_and_any_count_gives_the_same_result() -> None:
    """The library's OpenMP runtime is torch's (where torch runs on libgomp, as its Linux wheels
    do), and the result does not depend on the thread count (threads split the rows; each row
    sums in one order)."""
    _need(8)
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    if not any("libgomp" in line and "torch" in line for line in maps.splitlines()):
        pytest.skip("this torch does not run on its own libgomp")
    assert build.shares_torch_threads()
    blocks = _blocks(256, 512, 8, seed=5)
    payload, scales = matvec.repack(*_split(torch.from_numpy(blocks.copy()), QuantSpec("q8")))
    x = torch.randn(2, 512).to(torch.bfloat16)
    before = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            assert build.threads() == count
            results.append(matvec.matvec(8, payload, scales, 256, x, torch.float32))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])
