"""The Llama 1/2 transformer: one implementation for MHA, GQA and MQA.

Parameter names and the q/k layout are Meta's (`layers.0.attention.wq.weight`, rotary on
interleaved pairs), so a Meta state dict loads with no mapping; every other format is
translated to this layout by `llamactl.checkpoint`.
Shapes: B batch, T new tokens, S key positions attention reads, H heads, K kv heads,
G = H/K query heads per kv head, D head dim, V vocabulary.

There is one forward path. Every call writes its keys/values into the preallocated cache at
the positions of its tokens and attends, through a causal mask, over the first `kv_len`
cache positions; a decode step that must keep its shapes fixed (CUDA graph, torch.compile)
reads the whole cache (`kv_len=model.cache_len`) and passes its position as a device tensor.
Fusion of wq|wk|wv and w1|w3 happens once, after loading (`Transformer.fuse_projections`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

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
    """Meta's precompute_freqs_cis: unit complex rotations [max_positions, D/2] (complex64, CPU).

    Always computed on the CPU, also under `torch.device("meta")`, so a model built on the
    meta device has a real table; the model moves it to its weights' device on first use.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0,x1),(x2,x3)... as complex numbers; x [B,T,H,D], freqs [T,D/2]."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B,T,H,D/2]
    return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(-2).type_as(x)


class Window(NamedTuple):
    """Where one forward's tokens sit and what they read; built once, shared by every layer."""

    positions: torch.Tensor  # [T] long: positions of the new tokens
    freqs: torch.Tensor  # [T,D/2] complex64: their rotary factors
    kv_len: int  # attention reads cache positions 0..kv_len-1
    mask: torch.Tensor | None  # [T*rows,S] additive (attention_mask); None: every key visible
    rows: int  # mask rows per query token (query_rows)


class KVCache(nn.Module):
    """Keys and values of every position so far, preallocated once: k, v [B,K,max_seq_len,D].

    Fixed buffers are what make a decode step replayable: each step writes its position in
    place and reads the same tensors. Positions not written yet hold zeros and are masked.
    """

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

    def update(
        self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B,K,T,D] at `positions` [T]; return positions 0..kv_len-1 [B,K,kv_len,D]."""
        b = k.shape[0]  # a cache allocated for a larger batch serves smaller ones
        self.k[:b].index_copy_(2, positions, k)
        self.v[:b].index_copy_(2, positions, v)
        return self.k[:b, :, :kv_len], self.v[:b, :, :kv_len]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def query_rows(device: torch.device, group: int) -> int:
    """Mask rows per query token in `attend`: 1 where SDPA groups GQA heads itself, else G.

    On the CPU, SDPA's own GQA (enable_gqa) takes a mask and is the cheaper form: stories260K
    decodes at 1.28 ms/token that way against 1.46 with heads as rows (1 thread, medians of
    15 interleaved runs). On CUDA its fused kernels refuse a mask with enable_gqa and the
    math fallback copies every key for every step, so there the query heads that share a kv
    head become extra query rows of it: plain multi-head shapes every kernel accepts.
    """
    return 1 if device.type == "cpu" else group


def attention_mask(positions: torch.Tensor, keys: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Who may attend to what: [T*rows,S], 0 = attend, -inf = not (row t*rows+r is query t).

    Query t (at positions[t]) sees key s (at keys[s]) when keys[s] <= positions[t]: causal,
    and blind to cache slots no token has written yet. Built once per forward and additive
    in the activations' dtype, because SDPA turns a boolean mask into this on every call.
    """
    row_positions = positions.repeat_interleave(rows) if rows > 1 else positions  # [T*rows]
    return torch.where(keys[None, :] > row_positions[:, None], float("-inf"), 0.0).to(dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, rows: int) -> torch.Tensor:
    """Attention of q [B,T,H,D] over k, v [B,K,S,D] through mask [T*rows,S] -> [B,T,H*D].

    With rows = G (query_rows), GQA runs without copying keys: the G query heads that share
    a kv head become query rows t*G+g of that head ([B,K,T*G,D]), so head h reads kv head
    h // G exactly as Meta's repeat_kv does. With rows = 1, SDPA does the same grouping.
    No mask: every key is visible (one new token reading exactly the filled cache).
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[1]
    g = h // kv_heads
    if t == 1 and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return _one_query_cpu(q, k, v, mask)
    if mask is not None and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)  # SDPA wants the query's dtype
    if rows == 1:  # [B,H,T,D] against [B,K,S,D]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=g > 1)
        return out.transpose(1, 2).reshape(b, t, h * d)
    rows = q.view(b, t, kv_heads, g, d).transpose(1, 2).reshape(b, kv_heads, t * g, d)
    out = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask)  # [B,K,T*G,D]
    return out.view(b, kv_heads, t, g, d).transpose(1, 2).reshape(b, t, h * d)


def _one_query_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A decode step's attention on the CPU in 16-bit: q [B,1,H,D] over k, v [B,K,S,D] -> [B,1,H*D].

    SDPA's CPU kernel and torch's batched matmuls are slow for one 16-bit query and fast in fp32:
    widening q, k, v and running SDPA in fp32 takes 55 us over 256 keys (12 heads of 64, bf16,
    2 threads) against 84 for 16-bit matmuls with fp32 scores and 198 for 16-bit SDPA, and is
    SDPA's own fp32 arithmetic. The cache stays 16-bit (an fp32 one would skip the widening,
    about 15 us a layer at 256 keys, for twice the memory). The G query heads sharing a kv head
    are rows of it, as in `attend`; the mask (None, or [1,S]) broadcasts over them.
    """
    b, _, h, d = q.shape
    kv_heads = k.shape[1]
    rows = q.reshape(b, kv_heads, h // kv_heads, d).float()  # [B,K,G,D]
    wide_mask = None if mask is None else mask.float()
    out = F.scaled_dot_product_attention(rows, k.float(), v.float(), attn_mask=wide_mask)  # [B,K,G,D]
    return out.to(q.dtype).reshape(b, 1, h * d)


# ------------------------------------------------------------------ fused projections
#
# Projections of the same input (wq|wk|wv, w1|w3) can run as one matmul. Decoding at batch 1
# on a GPU is bound by kernel launches, not bandwidth, so 3 fewer matmuls per layer show.
# `Transformer.fuse_projections()` builds the fused nn.Linear once, from a concatenated copy
# (a real tensor: .to() / .cuda() move it like any other parameter), and removes the parts.
# The hooks below keep the fused model speaking Meta's names: state_dict() splits the fused
# weight back into wq/wk/wv (w1/w3), and load_state_dict() of Meta's names into a fused model
# concatenates them (gpt-fast's load hook). Only plain nn.Linear parts are fused: a projection
# a quantizer has replaced (set_submodule("layers.0.attention.wq", QuantizedLinear(...)))
# stays separate, and so do the others of its group.


def _fusable(linears: list[Any]) -> bool:
    return all(
        type(m) is nn.Linear
        and m.bias is None
        and m.weight.device.type != "meta"
        and m.in_features == linears[0].in_features
        for m in linears
    )


def _linear(weight: torch.Tensor, requires_grad: bool) -> nn.Linear:
    """An nn.Linear (no bias) holding exactly `weight` [out,in], with no throwaway init."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=requires_grad)
    return layer


class _Fusable(nn.Module):
    """A module whose children `PARTS` (same input) may be fused into the child `FUSED`.

    `ORDER` is Meta's order of the children in a state dict.
    """

    PARTS: tuple[str, ...] = ()
    FUSED = ""
    ORDER: tuple[str, ...] = ()

    def __init__(self, part_sizes: list[int]) -> None:
        super().__init__()
        self.part_sizes = part_sizes  # output features of each part, in PARTS order
        self.fused = False  # a plain flag: forward reads it every step
        self.register_state_dict_post_hook(_split_fused_state)
        self.register_load_state_dict_pre_hook(_join_fused_state)

    def fuse(self) -> bool:
        """Fuse the parts when they are all plain nn.Linear; True when fused (now or before)."""
        if self.fused:
            return True
        parts = [self._modules.get(name) for name in self.PARTS]
        if not _fusable(parts):
            return False
        weight = torch.cat([m.weight.detach() for m in parts])  # type: ignore[union-attr]
        self._set_children({self.FUSED: _linear(weight, parts[0].weight.requires_grad)})  # type: ignore[union-attr]
        self.fused = True
        return True

    def install_fused(self, module: nn.Module) -> None:
        """Put `module` (x [..., in] -> the parts' outputs joined, [..., sum(part_sizes)]) in place
        of the parts: a quantized backend's joined kernel (`Backend.joined_linear`)."""
        self._set_children({self.FUSED: module})
        self.fused = True

    def unfuse(self) -> None:
        """The inverse of fuse(): separate nn.Linear parts again, each its own tensor."""
        if not self.fused:
            return
        fused = self._modules[self.FUSED]
        if not isinstance(getattr(fused, "weight", None), torch.Tensor):  # a packed linear gives its weight back
            raise TypeError(f"{type(fused).__name__} joins quantized parts: it cannot be split into nn.Linear")
        weights = fused.weight.detach().split(self.part_sizes)  # type: ignore[union-attr]
        grad = fused.weight.requires_grad  # type: ignore[union-attr]
        self._set_children({name: _linear(w.clone(), grad) for name, w in zip(self.PARTS, weights)})
        self.fused = False

    def _set_children(self, new: dict[str, nn.Module]) -> None:
        """Swap the parts for the fused child or back, keeping children in Meta's order."""
        kept = {name: m for name, m in self._modules.items() if name not in (*self.PARTS, self.FUSED)}
        rank = {name: i for i, name in enumerate(self.ORDER)} | {self.FUSED: self.ORDER.index(self.PARTS[0])}
        children = sorted((kept | new).items(), key=lambda item: rank.get(item[0], len(rank)))  # stable
        self._modules.clear()
        self._modules.update(children)


def _split_fused_state(module: _Fusable, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """state_dict() post hook: the fused weight as Meta's parts, in Meta's order."""
    fused_key = f"{prefix}{module.FUSED}.weight"
    if fused_key not in state:
        return
    mine = {key: state.pop(key) for key in [k for k in state if k.startswith(prefix)]}
    weights = mine.pop(fused_key).split(module.part_sizes)
    mine |= {f"{prefix}{name}.weight": w for name, w in zip(module.PARTS, weights)}
    for child in module.ORDER:  # this module's entries are the last ones: re-adding keeps the order
        for key in [k for k in mine if k.startswith(f"{prefix}{child}.")]:
            state[key] = mine.pop(key)
    state.update(mine)


def _join_fused_state(module: _Fusable, state: dict[str, Any], prefix: str, *_args: Any) -> None:
    """load_state_dict() pre hook: Meta's parts into a fused module as one concatenated weight."""
    keys = [f"{prefix}{name}.weight" for name in module.PARTS]
    if module.fused and all(key in state for key in keys):
        state[f"{prefix}{module.FUSED}.weight"] = torch.cat([state.pop(key) for key in keys])


class Attention(_Fusable):
    PARTS, FUSED, ORDER = ("wq", "wk", "wv"), "wqkv", ("wq", "wk", "wv", "wo")

    def __init__(self, args: ModelArgs) -> None:
        kv = args.kv_heads * args.head_dim
        super().__init__([args.n_heads * args.head_dim, kv, kv])
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, window: Window) -> torch.Tensor:
        """x [B,T,dim] for the tokens at window.positions -> [B,T,dim]."""
        b, t, _ = x.shape
        h, kv, d = self.n_heads, self.n_kv_heads, self.head_dim
        if self.fused:  # q and k sit side by side in the fused output: one rotary pass for both
            qk, v = self.wqkv(x).split([(h + kv) * d, kv * d], dim=-1)
            q, k = apply_rope(qk.view(b, t, h + kv, d), window.freqs).split([h, kv], dim=2)  # [B,T,H|K,D]
        else:
            q = apply_rope(self.wq(x).view(b, t, h, d), window.freqs)  # [B,T,H,D]
            k = apply_rope(self.wk(x).view(b, t, kv, d), window.freqs)  # [B,T,K,D]
            v = self.wv(x)
        k = k.transpose(1, 2)  # [B,K,T,D]
        v = v.view(b, t, kv, d).transpose(1, 2)  # [B,K,T,D]
        if self.cache is not None:
            k, v = self.cache.update(window.positions, k, v, window.kv_len)  # [B,K,S,D]
        return self.wo(attend(q, k, v, window.mask, window.rows))


class FeedForward(_Fusable):
    PARTS, FUSED, ORDER = ("w1", "w3"), "w13", ("w1", "w2", "w3")

    def __init__(self, args: ModelArgs) -> None:
        super().__init__([args.hidden_dim, args.hidden_dim])
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, window: Window) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), window)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """tokens [B,T] at positions start..start+T-1 -> logits [B,T,V] in fp32."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # A plain attribute, not a buffer, so .to(bf16) never rounds it; it follows the
        # weights' device lazily (_rope), since .to() does not see plain attributes.
        self.freqs_cis = rope_table(args.head_dim, args.max_seq_len, args.rope_theta)

    def reset_rope(self, positions: int) -> None:
        """(Re)build the rotary table for `positions` positions."""
        self.freqs_cis = rope_table(self.args.head_dim, positions, self.args.rope_theta)

    def _rope(self, device: torch.device) -> torch.Tensor:
        if self.freqs_cis.device != device:  # once after a move: a CUDA graph replay never gets here
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    def fuse_projections(self) -> Transformer:
        """Fuse wq|wk|wv and w1|w3 of every block whose parts are plain nn.Linear; returns self.

        Call it once, after the weights (and any quantized projections) are in place: the
        loader does. state_dict() still has Meta's names and layout; `unfuse_projections()`
        undoes it. Moving or casting the model afterwards keeps the fusion.
        """
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()
        return self

    def unfuse_projections(self) -> None:
        """Separate projections again (a quantizer replaces them one by one)."""
        for layer in self.layers:
            layer.attention.unfuse()
            layer.feed_forward.unfuse()

    def setup_cache(self, batch: int = 1, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> int:
        """Allocate a KV cache in every layer; returns its size in bytes."""
        length = max_seq_len or self.args.max_seq_len
        if length > self.freqs_cis.shape[0]:
            self.reset_rope(length)
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = self.tok_embeddings.weight.device
        for layer in self.layers:
            # The attention's own KV heads: a tensor-parallel shard holds n_kv_heads / N of them.
            attention = layer.attention
            attention.cache = KVCache(batch, length, attention.n_kv_heads, self.args.head_dim, dtype, device)
        return self.cache_bytes

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    @property
    def cache_bytes(self) -> int:
        """Bytes of the KV cache every layer holds (0 without a cache)."""
        return sum(layer.attention.cache.nbytes for layer in self.layers if layer.attention.cache is not None)

    @property
    def cache_len(self) -> int:
        """Positions the cache can hold (0 without a cache)."""
        cache = self.layers[0].attention.cache if len(self.layers) else None
        return cache.k.shape[2] if cache is not None else 0

    def forward(
        self, tokens: torch.Tensor, start: int | torch.Tensor = 0, kv_len: int | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """Logits [B,T,V] (fp32) for tokens [B,T] at positions start..start+T-1.

        `last_only`: logits [B,1,V] of the last position alone. A prefill needs no others, and
        the head (vocab x dim per position) is a fifth of a 110M model's prefill arithmetic;
        llama.cpp and transformers' `logits_to_keep=1` skip it the same way.

        `start`: an int, or a [1] long tensor on the device (a CUDA graph replays the same
        tensor with a new value). `kv_len`: the cache positions attention reads, 0..kv_len-1;
        by default through the last new token (start+T, read on the host). Slots beyond the
        new tokens are masked anyway, so reading more changes nothing but the cost: a step
        that must keep static shapes passes `kv_len=self.cache_len`.
        Without a cache, the tokens attend to each other only (causally).
        """
        window = self._window(tokens, start, kv_len)
        h = self.tok_embeddings(tokens)
        with sdpa_kernel(_SDPA_BACKENDS):
            for layer in self.layers:
                h = layer(h, window)
        if last_only:
            h = h[:, -1:]  # [B,1,dim]
        return self.output(self.norm(h)).float()

    def _window(self, tokens: torch.Tensor, start: int | torch.Tensor, kv_len: int | None) -> Window:
        t, device = tokens.shape[1], tokens.device
        cache_len = self.cache_len
        # One new token reading exactly the filled cache sees every key: no mask to build or apply.
        everything_visible = kv_len is None and t == 1
        kv_len = int(start) + t if kv_len is None else kv_len
        limit = cache_len or self.freqs_cis.shape[0]
        if kv_len > limit:
            where = "KV cache" if cache_len else "rotary table"
            raise ValueError(f"positions up to {kv_len - 1} exceed the {where} ({limit} positions)")
        positions = torch.arange(t, device=device) + start  # [T]
        freqs = self._rope(device).index_select(0, positions)  # [T,D/2]
        rows = query_rows(device, self.args.n_heads // self.args.kv_heads)
        if everything_visible:
            return Window(positions, freqs, kv_len, None, rows)
        keys = torch.arange(kv_len, device=device) if cache_len else positions  # [S]
        mask = attention_mask(positions, keys, rows, self.tok_embeddings.weight.dtype)  # [T*rows,S]
        return Window(positions, freqs, kv_len, mask, rows)
