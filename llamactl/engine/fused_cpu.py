"""The CPU decode step through native kernels: eight calls a layer where torch's operators take ~45.

A one-token step of a 110M model on 2 cores spends about as long in small eager operators
(RMSNorm's nine, casts, rotary, cache writes, attention's widening copies: a few microseconds
of dispatch each) as in its matmuls. `FusedCpuStep` walks the layers itself and does everything
between the projections in the kernels of decode_kernels.cpp (llamactl/cpu): per layer one
residual-add + RMSNorm, the qkv projection, rotary + cache store, attention, the output
projection, add + RMSNorm, the w1|w3 projection, SiLU * up, w2. The projections are the
model's own modules (packed, quantized or plain), so every weight scheme gets the step; a q4 / q8,
bf16 or fp32 weight on a native matvec is called straight into a buffer of the step's (`_Projection`).

The arithmetic is the eager step's (fp32 inside, rounded to the activations' dtype where torch
rounds), so logits agree with `model(tokens, pos)` to summation order; tests/engine/test_fused_cpu.py
checks that against the plain forward for every dtype and weight scheme. Anything the kernels do
not cover (a batch, several tokens, another cache dtype) runs the plain forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.modules import module as _nn_module

from llamactl.cpu.build import threads as cpu_threads
from llamactl.cpu.decode import DTYPES, MAX_HEAD_DIM, Kernels
from llamactl.cpu.matvec import BoundDenseMatvec, BoundMatvec
from llamactl.engine.eager import EagerStep
from llamactl.model import Transformer, attend

# Where the kernels cannot share torch's threads (`cpu.build.threads`: one thread), attention over
# more than this many query-head x position x head-dim values goes to torch's threaded SDPA; below
# it the one-thread kernel wins. On torch's threads the kernel won at every length measured (MHA
# 12 x 64 and GQA 32 / 8 x 128, fp32 and bf16, 128 to 4096 positions, 2 threads: 1.0-2.9x).
ATTEND_LIMIT = 1 << 18


def fusable(model: Transformer) -> str | None:
    """Why `model` cannot decode through the fused step, or None when it can."""
    if type(model) is not Transformer:  # a tensor-parallel shard's forward talks to other ranks
        return f"{type(model).__name__} decodes through its own forward"
    dtype, device = model.tok_embeddings.weight.dtype, model.tok_embeddings.weight.device
    if device.type != "cpu":
        return "the fused step runs on the CPU"
    args = model.args
    if args.head_dim % 2 or args.head_dim > MAX_HEAD_DIM or args.n_heads % args.kv_heads:
        return f"head dim {args.head_dim} / {args.n_heads} heads over {args.kv_heads}: not what the kernels handle"
    norms = [model.norm] + [n for layer in model.layers for n in (layer.attention_norm, layer.ffn_norm)]
    if any(n.weight.dtype != dtype or n.weight.device != device for n in norms):
        return "norm weights differ from the activations' dtype"
    if dtype not in DTYPES:
        return f"no native kernels for {dtype}"
    return None


class _Projection:
    """One token's x [1,1,in] -> y [1,1,out] in the activations' dtype. A weight on a native
    matvec (NativeLinear's q4 / q8, GemvLinear's bf16 / fp32) writes straight into a buffer of its own:
    no module call, reshape, allocation or cast, ~12 of the ~16 us of Python such a call costs,
    ~50 calls a token. Any other projection runs its module. The buffer is rewritten by the next
    step."""

    def __init__(self, module: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> None:
        self.module, self.dtype = module, dtype
        bound = getattr(module, "matvec", None)
        self._raw = None
        native = isinstance(bound, (BoundMatvec, BoundDenseMatvec)) and bound.x_dtype == dtype
        if native and getattr(module, "out_dtype", None) is None:
            self.out = torch.empty(1, 1, bound.n, dtype=dtype)
            self._out_ptr, self._raw = self.out.data_ptr(), bound.raw(dtype)

    @property
    def direct(self) -> bool:
        """Whether the native matvec runs it into the buffer (else the module)."""
        return self._raw is not None

    def __call__(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        if self._raw is None or _hooked(self.module):  # e.g. tensor parallel's all-reduce after wo, w2
            return _ready(self.module(x), self.dtype)
        self._raw(x.data_ptr(), self._out_ptr, 1, threads)  # x: contiguous, the step's own buffer
        return self.out


class _Layer:
    """One block's pieces, looked up once (nn.Module attribute access costs per token)."""

    def __init__(self, layer: torch.nn.Module, dtype: torch.dtype) -> None:
        attention, ffn = layer.attention, layer.feed_forward
        self.attention = attention  # its `cache` is read per call: setup_cache may replace it
        self.attention_norm, self.ffn_norm = layer.attention_norm, layer.ffn_norm
        self.wo, self.w2 = _Projection(attention.wo, dtype), _Projection(ffn.w2, dtype)
        if attention.fused:
            self.qkv = _Projection(attention.wqkv, dtype)
        else:  # separate (e.g. bitsandbytes) projections: joined by one copy
            wq, wk, wv = attention.wq, attention.wk, attention.wv
            self.qkv = _Projection(lambda x: torch.cat([wq(x), wk(x), wv(x)], dim=-1), dtype)
        if ffn.fused:
            self.gate_up = _Projection(ffn.w13, dtype)
        else:
            w1, w3 = ffn.w1, ffn.w3
            self.gate_up = _Projection(lambda x: torch.cat([w1(x), w3(x)], dim=-1), dtype)


class FusedCpuStep(EagerStep):
    """`model(tokens, pos)` for one token at batch 1 through the native kernels (else the plain forward)."""

    kind = "fused"

    def __init__(self, model: Transformer, native: Kernels) -> None:
        super().__init__(model)
        self.native = native
        self.dtype = model.tok_embeddings.weight.dtype
        args = model.args
        self.dim, self.heads, self.kv_heads, self.head_dim = args.dim, args.n_heads, args.kv_heads, args.head_dim
        self.layers = [_Layer(layer, self.dtype) for layer in model.layers]
        self._fresh_embedding = type(model.tok_embeddings) is torch.nn.Embedding  # returns a new tensor
        # Inputs of the projections, rewritten every layer: nothing outlives a step but the logits.
        self._normed = torch.empty(1, 1, self.dim, dtype=self.dtype)
        self._attended = torch.empty(1, 1, self.heads * self.head_dim, dtype=self.dtype)
        self._hidden = torch.empty(1, 1, args.hidden_dim, dtype=self.dtype)
        self._scores = torch.empty(0, dtype=torch.float32)  # attention's scratch, a float per head and position

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        model = self.model
        cache = self.layers[0].attention.cache if self.layers else None
        if (
            tokens.shape != (1, 1)
            or cache is None
            or cache.k.dtype != self.dtype
            or not 0 <= pos < min(cache.k.shape[2], model.freqs_cis.shape[0])
        ):
            return super().__call__(tokens, pos)  # the plain forward (and its errors)
        if torch.is_grad_enabled():
            with torch.inference_mode():
                return self._step(tokens, pos)
        return self._step(tokens, pos)

    def _step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        model, native, dtype = self.model, self.native, self.dtype
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        freqs = model.freqs_cis  # [P, D/2] complex64 on the CPU, contiguous (rope_table)
        freqs_at = freqs.data_ptr() + pos * freqs.stride(0) * freqs.element_size()  # [D/2] (cos, sin)
        if self._scores.numel() < heads * (pos + 1):
            self._scores = torch.empty(heads * model.cache_len, dtype=torch.float32)
        threads = cpu_threads()
        in_kernel = threads >= torch.get_num_threads() or (pos + 1) * heads * head_dim <= ATTEND_LIMIT
        normed, attended = self._normed, self._attended
        # The residual stream, updated in place by every norm that adds a block's output to it.
        residual = model.tok_embeddings(tokens)  # [1,1,dim]
        if not self._fresh_embedding:
            residual = residual.clone()
        delta: torch.Tensor | None = None  # the last block's output, added by the next norm
        for layer in self.layers:
            self._add_norm(residual, delta, layer.attention_norm)
            qkv = layer.qkv(normed, threads)  # [1,1,(H+2K)*D]
            cache = layer.attention.cache
            k_ptr, v_ptr, cap = cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape[2]
            native.rope_store(qkv.data_ptr(), freqs_at, k_ptr, v_ptr, pos, heads, kv_heads, head_dim, cap)
            if in_kernel:
                native.attend(
                    qkv.data_ptr(), k_ptr, v_ptr, pos, heads, kv_heads, head_dim, cap,
                    attended.data_ptr(), self._scores.data_ptr(), threads,
                )  # fmt: skip
                out = attended
            else:
                q = qkv[..., : heads * head_dim].view(1, 1, heads, head_dim)
                out = _ready(attend(q, cache.k[:1, :, : pos + 1], cache.v[:1, :, : pos + 1], None, 1), dtype)
            self._add_norm(residual, layer.wo(out, threads), layer.ffn_norm)
            gate_up = layer.gate_up(normed, threads)  # [1,1,2F]
            hidden = self._hidden_for(gate_up.shape[-1] // 2)
            native.silu_mul(gate_up.data_ptr(), hidden.data_ptr(), hidden.shape[-1])
            delta = layer.w2(hidden, threads)
        self._add_norm(residual, delta, model.norm)
        return model.output(normed).float()

    def _hidden_for(self, size: int) -> torch.Tensor:
        if self._hidden.shape[-1] != size:  # the FFN's own width, should it differ from args.hidden_dim
            self._hidden = torch.empty(1, 1, size, dtype=self.dtype)
        return self._hidden

    def _add_norm(self, residual: torch.Tensor, delta: torch.Tensor | None, norm: torch.nn.Module) -> None:
        """residual += delta (in place, rounded as torch's add rounds), then its RMSNorm into `_normed`."""
        ptr = residual.data_ptr()
        extra = None if delta is None else delta.data_ptr()
        self.native.rms_norm(ptr, extra, norm.weight.data_ptr(), ptr, self._normed.data_ptr(), self.dim, norm.eps)

    def __repr__(self) -> str:
        return "FusedCpuStep()"


def _hooked(module: torch.nn.Module) -> bool:
    """Whether calling the module runs forward hooks (its own or global) that its kernel alone would skip."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or _nn_module._global_forward_hooks
        or _nn_module._global_forward_pre_hooks
    )


def _ready(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as the kernels read it: contiguous, in the activations' dtype (a padded kernel returns a view)."""
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()
