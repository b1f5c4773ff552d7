from __future__ import annotations

import pytest
import torch

from llamactl.checkpoint.keymap import hf_to_meta_name, meta_to_hf_name, permute_for_hf, rotary_heads, unpermute_from_hf
from llamactl.checkpoint.sharding import expected_shapes
from tests._ckpt import tiny_args


def test_every_meta_name_maps_to_hf_and_back() -> None:
    names = list(expected_shapes(tiny_args()))
    hf = [meta_to_hf_name(n) for n in names]
    assert None not in hf and len(set(hf)) == len(names)
    assert [hf_to_meta_name(h) for h in hf] == names
    assert meta_to_hf_name("layers.0.attention.rope") is None and hf_to_meta_name("model.foo") is None


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_permutation_matches_rotary_layouts(heads: int) -> None:
    head_dim, cols = 8, 3
    w = torch.arange(heads * head_dim * cols, dtype=torch.float32).view(heads * head_dim, cols)
    hf = permute_for_hf(w, heads)
    assert torch.equal(unpermute_from_hf(hf, heads), w)
    # Meta rotates rows (0,1),(2,3)...; HF rotates row i with row i + head_dim/2 in each head.
    for h in range(heads):
        meta_rows, hf_rows = w[h * head_dim : (h + 1) * head_dim], hf[h * head_dim : (h + 1) * head_dim]
        assert torch.equal(hf_rows[: head_dim // 2], meta_rows[0::2])
        assert torch.equal(hf_rows[head_dim // 2 :], meta_rows[1::2])


def test_rotary_heads_uses_kv_heads_for_wk() -> None:
    assert rotary_heads("layers.3.attention.wq.weight", 64, 8) == 64
    assert rotary_heads("layers.3.attention.wk.weight", 64, 8) == 8
    assert rotary_heads("layers.3.attention.wv.weight", 64, 8) is None
