"""The rotary row permutation between Meta's and Hugging Face's q/k layouts.

Meta's rotary embedding rotates interleaved pairs (x0,x1),(x2,x3)... of each head;
transformers rotates the two halves of each head. Converting permutes the rows of wq (by
n_heads) and wk (by n_kv_heads: with GQA wk has only kv_heads * head_dim rows); which
tensors and by how many heads is `llamactl.layout.rotary_heads`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def permute_for_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta interleaved-pair rows -> HF half-split rows, per head. w: [heads*D, in]."""
    rows, cols = w.shape
    return hf_rows_view(w, heads).reshape(rows, cols)


def hf_rows_view(w: torch.Tensor, heads: int) -> torch.Tensor:
    """permute_for_hf without the copy: a [heads, 2, D/2, in] view whose C-order rows are HF's."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2)


def unpermute_from_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of permute_for_hf."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_index(rows: int, heads: int) -> torch.Tensor:
    """Indices i such that meta_out = hf_out[..., i] for a q/k projection (an output gather)."""
    import torch

    return unpermute_from_hf(torch.arange(rows).view(rows, 1), heads).flatten()
