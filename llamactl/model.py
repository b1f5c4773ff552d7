"""The Llama 1/2 transformer: one implementation for MHA, GQA and MQA.

Parameter names and the q/k layout are Meta's (`layers.0.attention.wq.weight`, rotary on
interleaved pairs), so a Meta state dict loads with no mapping; every other format is
translated to this layout by `llamactl.checkpoint`.
Shapes: B batch, T new tokens, S cached positions, H heads, K kv heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from llamactl.config import ModelArgs

# cuDNN's SDPA backend (torch's first choice for bf16 on Hopper) plans a new graph for every
# new key length, i.e. at every decoding step: on an H100 with stories260K in bf16, 15 tok/s
# with it against 120-270 tok/s without. Flash / memory-efficient kernels have no per-shape
# setup, so the model leaves cuDNN out.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 then cast back, as Meta and transformers both do.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_positions, D/2] in fp32, Meta's precompute_freqs_cis without complex."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0,x1),(x2,x3)...; x [B,T,H,D], cos/sin [T,D/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B,T,H,D/2,2]
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys/values [B,K,max_seq_len,D]; static shapes keep torch.compile happy."""

    def __init__(
        self,
        batch: int,
        max_seq_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B,K,T,D] at positions start.. and return the filled prefix [B,K,start+T,D]."""
        end = start + k.shape[2]
        self.k[: k.shape[0], :, start:end] = k
        self.v[: v.shape[0], :, start:end] = v
        return self.k[: k.shape[0], :, :end], self.v[: v.shape[0], :, :end]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = apply_rope(self.wq(x).view(b, t, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).view(b, t, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.cache is not None:
            k, v = self.cache.update(start, k, v)  # [B,K,S,D] with S = start + t
        if t == 1:
            mask, causal = None, False  # one new token sees every cached position
        elif k.shape[2] == t:
            mask, causal = None, True
        else:  # a later chat turn: new tokens see the cache and earlier new tokens
            mask, causal = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(start), False
        gqa = self.n_kv_heads != self.n_heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start, cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """tokens [B,T] at positions start..start+T-1 -> logits [B,T,vocab] in fp32."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .to(bf16) must not round the rotary tables: rebuild them in fp32 on the new device.
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32 and self.rope_cos.device.type != "meta":
            self.reset_rope(self.rope_cos.shape[0])
        return self

    def reset_rope(self, positions: int) -> None:
        """(Re)build the fp32 rotary tables for `positions` positions on the weights' device."""
        cos, sin = rope_tables(self.args.head_dim, positions, self.args.rope_theta)
        device = self.tok_embeddings.weight.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def setup_cache(self, batch: int = 1, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> int:
        """Allocate a KV cache in every layer; returns its size in bytes."""
        length = max_seq_len or self.args.max_seq_len
        if length > self.rope_cos.shape[0]:
            self.reset_rope(length)
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = self.tok_embeddings.weight.device
        for layer in self.layers:
            layer.attention.cache = KVCache(batch, length, self.args.kv_heads, self.args.head_dim, dtype, device)
        return sum(layer.attention.cache.nbytes for layer in self.layers)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    @property
    def cache_len(self) -> int:
        """Positions the cache can hold (0 without a cache)."""
        cache = self.layers[0].attention.cache if len(self.layers) else None
        return cache.k.shape[2] if cache is not None else 0

    def forward(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        t = tokens.shape[1]
        if start + t > self.rope_cos.shape[0]:
            raise ValueError(f"positions {start}..{start + t - 1} exceed the rotary table ({self.rope_cos.shape[0]})")
        cos, sin = self.rope_cos[start : start + t], self.rope_sin[start : start + t]
        h = self.tok_embeddings(tokens)
        with sdpa_kernel(_SDPA_BACKENDS):
            for layer in self.layers:
                h = layer(h, start, cos, sin)
        return self.output(self.norm(h)).float()
