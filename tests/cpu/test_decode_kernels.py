"""The one-token decode kernels (llamactl/cpu/decode_kernels.cpp) called directly, against torch's own
operators: attention against scaled_dot_product_attention (every cache length from 1 to past a few
blocks of 16 keys, MHA and GQA), SiLU * up against F.silu(gate) * up (lengths past the kernel's
chunk of 256). The fused step's tests run them only at a tiny model's widths and lengths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamactl.cpu.decode import Kernels, kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _kernels(dtype: torch.dtype) -> Kernels:
    found = kernels(dtype)
    if found is None:
        pytest.skip(f"no native decode kernels for {dtype} here (no C++ compiler, or it lacks that type)")
    return found


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 64), (8, 2, 32), (2, 1, 24)])
def test_attend_matches_sdpa_at_every_cache_length(dtype_name: str, heads: int, kv_heads: int, head_dim: int) -> None:
    dtype = DTYPES[dtype_name]
    native = _kernels(dtype)
    cap = 80  # the cache's capacity: lengths 1..70 read a prefix of it
    gen = torch.Generator().manual_seed(5)
    kc = torch.randn(kv_heads, cap, head_dim, generator=gen).to(dtype)  # [K, cap, D]
    vc = torch.randn(kv_heads, cap, head_dim, generator=gen).to(dtype)
    out = torch.empty(heads * head_dim, dtype=dtype)
    scratch = torch.empty(heads * cap, dtype=torch.float32)
    for pos in range(70):  # 16-key blocks (then the rest one key at a time) from pos 15 on
        qkv = torch.randn((heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
        native.attend(
            qkv.data_ptr(), kc.data_ptr(), vc.data_ptr(), pos, heads, kv_heads, head_dim, cap,
            out.data_ptr(), scratch.data_ptr(), 2,
        )  # fmt: skip
        q = qkv[: heads * head_dim].float().view(1, heads, 1, head_dim)
        group = heads // kv_heads
        k = kc[:, : pos + 1].float().repeat_interleave(group, dim=0).unsqueeze(0)  # [1, H, pos+1, D]
        v = vc[:, : pos + 1].float().repeat_interleave(group, dim=0).unsqueeze(0)
        want = F.scaled_dot_product_attention(q, k, v).view(-1)
        # fp32 inside either way; bf16 adds one rounding of the output
        tolerance = 1e-5 if dtype == torch.float32 else 2**-8
        error = (out.float() - want).abs().max().item()
        assert error <= tolerance * max(1.0, want.abs().max().item()), f"pos {pos}: {error}"


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("size", [1, 255, 256, 600])
def test_silu_mul_matches_torch(dtype_name: str, size: int) -> None:
    dtype = DTYPES[dtype_name]
    native = _kernels(dtype)
    gate_up = (torch.randn(2 * size, generator=torch.Generator().manual_seed(size)) * 4).to(dtype)  # [g | u]
    gate_up[0] = float("nan") if size > 1 else gate_up[0]  # NaN stays NaN (and stays in its place)
    out = torch.full((size,), 7.0, dtype=dtype)
    native.silu_mul(gate_up.data_ptr(), out.data_ptr(), size)
    want = F.silu(gate_up[:size]) * gate_up[size:]  # rounded to dtype after each op, as the kernel
    assert torch.equal(out.isnan(), want.isnan())
    finite = ~want.isnan()
    # e^x to ~2 fp32 ulp: after rounding to bf16 an output is equal or one bf16 step away
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    assert torch.allclose(out[finite].float(), want[finite].float(), rtol=tolerance, atol=1e-6)
