"""llamactl.estimate: the KV-cache formula against published per-token sizes."""

from __future__ import annotations

import torch

from llamactl.config import get_preset
from llamactl.estimate import kv_cache_bytes


def test_kv_formula_matches_published_per_token_sizes() -> None:
    # Llama-2-7B in fp16: 2 × 32 layers × 32 heads × 128 × 2 bytes = 512 KiB per token;
    # Llama-2-70B (GQA, 8 KV heads): 2 × 80 × 8 × 128 × 2 = 320 KiB per token.
    assert kv_cache_bytes(get_preset("7b"), tokens=1, batch=1, dtype="fp16") == 512 * 1024
    assert kv_cache_bytes(get_preset("70b"), tokens=1, batch=1, dtype="fp16") == 320 * 1024
    assert kv_cache_bytes(get_preset("7b"), tokens=4096, batch=1, dtype="bf16") == 2 * 1024**3
    assert kv_cache_bytes(get_preset("7b"), tokens=4096, batch=3, dtype="fp32") == 12 * 1024**3


def test_kv_formula_takes_any_dtype_spelling() -> None:
    # bench passes the short name of the dtype it built with; a torch.dtype means the same.
    args = get_preset("7b")
    assert kv_cache_bytes(args, 16, 2, torch.bfloat16) == kv_cache_bytes(args, 16, 2, "bf16")


def test_tensor_parallel_shares_and_choices() -> None:
    import pytest

    from llamactl.errors import UsageError
    from llamactl.estimate import check_tp, rank_infos, shape_infos, tp_choices, weight_bytes

    big = get_preset("70b")
    assert kv_cache_bytes(big, tokens=1, dtype="fp16", tp=8) == 320 * 1024 // 8  # one of the 8 KV heads per rank
    assert tp_choices(big) == [1, 2, 4, 8]  # 8 KV heads: no more than 8 ranks, and only divisors
    infos = shape_infos(big)
    norms = (2 * 80 + 1) * 8192 * 2
    assert weight_bytes(rank_infos(infos, 8)) == (weight_bytes(infos) - norms) // 8 + norms
    with pytest.raises(UsageError, match="n_kv_heads 8 is not divisible by 16"):
        check_tp(big, 16)
