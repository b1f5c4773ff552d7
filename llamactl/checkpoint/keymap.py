"""Meta <-> Hugging Face tensor names and the rotary permutation of wq / wk.

Meta's rotary embedding rotates interleaved pairs (x0,x1),(x2,x3)...; transformers rotates
the two halves of each head. Converting permutes the rows of wq (by n_heads) and wk (by
n_kv_heads: with GQA wk has only kv_heads * head_dim rows).
"""

from __future__ import annotations

import re

import torch

_LAYER_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_MAP_BACK = {v: k for k, v in _LAYER_MAP.items()}
_TOP_MAP_BACK = {v: k for k, v in _TOP_MAP.items()}
_META_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Tensors some HF checkpoints carry that hold no weights (recomputed by every loader).
HF_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
# Meta's Llama 1 checkpoints carry the rotary frequencies; the model recomputes them.
META_IGNORED = frozenset({"rope.freqs"})


def meta_to_hf_name(name: str) -> str | None:
    """HF name for a Meta name, or None when the name is not a Llama weight."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    match = _META_LAYER.match(name)
    if match and match.group(2) in _LAYER_MAP:
        return f"model.layers.{match.group(1)}.{_LAYER_MAP[match.group(2)]}"
    return None


def hf_to_meta_name(name: str) -> str | None:
    """Meta name for an HF name, or None when the name is not a Llama weight."""
    if name in _TOP_MAP_BACK:
        return _TOP_MAP_BACK[name]
    match = _HF_LAYER.match(name)
    if match and match.group(2) in _LAYER_MAP_BACK:
        return f"layers.{match.group(1)}.{_LAYER_MAP_BACK[match.group(2)]}"
    return None


def rotary_heads(meta_name: str, n_heads: int, n_kv_heads: int) -> int | None:
    """Heads to permute by for wq (n_heads) and wk (n_kv_heads); None for other tensors."""
    if meta_name.endswith("attention.wq.weight"):
        return n_heads
    if meta_name.endswith("attention.wk.weight"):
        return n_kv_heads
    return None


def permute_for_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta interleaved-pair rows -> HF half-split rows, per head. w: [heads*D, in]."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_from_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of permute_for_hf."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
