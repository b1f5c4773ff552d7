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
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_table(head_dim: int, max_positions: int, theta: float) -> torch.Tensor:
    """Meta's precompute_freqs_cis: unit complex rotations [max_positions, D/2] (complex64)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0,x1),(x2,x3)... as complex numbers; x [B,T,H,D], freqs [T,D/2]."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B,T,H,D/2]
    return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(-2).type_as(x)


def _fuse(linears: list[nn.Linear]) -> torch.Tensor | None:
    """One weight for several projections of the same input; the originals become views of it.

    Fewer matmuls per token matters when decoding is launch-bound (small batches on a GPU).
    The views keep state_dict() in Meta's names and layout. Quantized projections (not plain
    nn.Linear) are left alone.
    """
    if not all(type(m) is nn.Linear and m.weight.device.type != "meta" for m in linears):
        return None
    fused = torch.cat([m.weight.detach() for m in linears])
    for module, part in zip(linears, fused.split([m.out_features for m in linears])):
        module.weight = nn.Parameter(part, requires_grad=False)
    return fused


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

    def update_at(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one step's k/v [B,K,1,D] at the position held in `pos` ([1] long tensor) and
        return the whole cache: shapes never change, so the step can be a CUDA graph."""
        self.k[: k.shape[0]].index_copy_(2, pos, k)
        self.v[: v.shape[0]].index_copy_(2, pos, v)
        return self.k[: k.shape[0]], self.v[: v.shape[0]]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def _causal_mask(t: int, s: int, start: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for t new tokens at positions start.. against s cached keys."""
    if t == 1:
        return None, False  # one new token sees every cached position
    if s == t:
        return None, True
    # a later chat turn: new tokens see the cache and earlier new tokens
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(start), False


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None
        self.wqkv: torch.Tensor | None = None  # set by Transformer.fuse_projections

    def forward(
        self, x: torch.Tensor, start: int | torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`mask` [1,1,1,max_seq_len] comes with a tensor `start` (the static decode step)."""
        b, t, _ = x.shape
        if self.wqkv is not None:
            kv_size = self.n_kv_heads * self.head_dim
            q, k, v = F.linear(x, self.wqkv).split([self.n_heads * self.head_dim, kv_size, kv_size], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = apply_rope(q.view(b, t, self.n_heads, self.head_dim), freqs).transpose(1, 2)
        k = apply_rope(k.view(b, t, self.n_kv_heads, self.head_dim), freqs).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if isinstance(start, torch.Tensor):  # static decode step: attend over the whole cache, masked
            assert self.cache is not None and mask is not None and t == 1
            k, v = self.cache.update_at(start, k, v)  # [B,K,max_seq_len,D]
            # GQA without copying keys: each KV head's query heads become its "query positions"
            # ([B,K,H/K,D]); head h uses KV head h // (H/K), as repeat_interleave would.
            grouped = q.reshape(b, self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim)
            out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask)
            return self.wo(out.reshape(b, 1, -1))
        else:
            if self.cache is not None:
                k, v = self.cache.update(start, k, v)  # [B,K,S,D] with S = start + t
            mask, causal = _causal_mask(t, k.shape[2], start, x.device)
        gqa = self.n_kv_heads != self.n_heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w13: torch.Tensor | None = None  # set by Transformer.fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = F.linear(x, self.w13).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self, x: torch.Tensor, start: int | torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start, freqs, mask)
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
        # A plain attribute, not a buffer: .to(bf16) must never touch it; _apply rebuilds it.
        self.freqs_cis = rope_table(args.head_dim, args.max_seq_len, args.rope_theta)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Fused projections are views of one tensor: moving or casting would silently split them.
        self.unfuse_projections()
        super()._apply(fn, recurse)
        if self.tok_embeddings.weight.device.type != "meta":
            self.reset_rope(self.freqs_cis.shape[0])  # follow the weights to their device
        return self

    def reset_rope(self, positions: int) -> None:
        """(Re)build the rotary table for `positions` positions on the weights' device."""
        table = rope_table(self.args.head_dim, positions, self.args.rope_theta)
        self.freqs_cis = table.to(self.tok_embeddings.weight.device)

    def fuse_projections(self) -> Transformer:
        """wq|wk|wv and w1|w3 as one matmul each; call after the model is on its device.

        Decoding a token at batch 1 on a GPU is bound by kernel launches, not bandwidth, so
        3 fewer matmuls per layer is measurable. Undone by any .to() / .cuda().
        """
        for layer in self.layers:
            attn, ffn = layer.attention, layer.feed_forward
            attn.wqkv = attn.wqkv if attn.wqkv is not None else _fuse([attn.wq, attn.wk, attn.wv])
            ffn.w13 = ffn.w13 if ffn.w13 is not None else _fuse([ffn.w1, ffn.w3])
        return self

    def unfuse_projections(self) -> None:
        for layer in self.layers:
            layer.attention.wqkv = layer.feed_forward.w13 = None

    def setup_cache(self, batch: int = 1, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> int:
        """Allocate a KV cache in every layer; returns its size in bytes."""
        length = max_seq_len or self.args.max_seq_len
        if length > self.freqs_cis.shape[0]:
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

    def forward(self, tokens: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """`start` an int: positions start..start+T-1. A [1] long tensor: one decode step
        (T=1) whose position lives on the device, the form a CUDA graph can replay."""
        t = tokens.shape[1]
        mask = None
        if isinstance(start, torch.Tensor):
            freqs = self.freqs_cis.index_select(0, start)
            mask = (torch.arange(self.cache_len, device=tokens.device) <= start).view(1, 1, 1, -1)
        elif start + t > self.freqs_cis.shape[0]:
            raise ValueError(f"positions {start}..{start + t - 1} exceed the rotary table ({self.freqs_cis.shape[0]})")
        else:
            freqs = self.freqs_cis[start : start + t]
        h = self.tok_embeddings(tokens)
        with sdpa_kernel(_SDPA_BACKENDS):
            for layer in self.layers:
                h = layer(h, start, freqs, mask)
        return self.output(self.norm(h)).float()
