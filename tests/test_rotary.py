from __future__ import annotations

import pytest
import torch

from llamactl.rotary import hf_to_meta_index, permute_for_hf, unpermute_from_hf


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


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_output_gather_undoes_the_permutation(heads: int) -> None:
    w = torch.randn(heads * 8, 5)
    x = torch.randn(3, 5)
    hf_out = x @ permute_for_hf(w, heads).T
    assert torch.equal(hf_out[:, hf_to_meta_index(w.shape[0], heads)], x @ w.T)
