"""THE Llama tensor table: every weight's name in each format and how it is split and stored.

One row per tensor kind: its Meta name (the canonical key, e.g. `layers.3.attention.wq.weight`),
its Hugging Face and GGUF names, the model-parallel split dim (Meta's model.py:
ColumnParallelLinear splits dim 0, RowParallelLinear and ParallelEmbedding dim 1, norms are
replicated), whether weight-only quantization applies (the seven block projections, as
transformers quantizes them), and whether its rows are rotary-permuted between Meta's
interleaved pairs and Hugging Face's half split (wq by the heads, wk by the KV heads).
Key maps, sharding, quantization, `info` and `bench` all read this table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from llamactl import dtypes
from llamactl.config import ModelArgs

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype (a short name from `llamactl.dtypes`) of a tensor, known before its bytes.

    `scheme` names the quantization scheme when the tensor is stored quantized; `stored_bytes`
    is then what its packed data and statistics take (else numel × itemsize).
    """

    name: str
    shape: Shape
    dtype: str
    scheme: str | None = None
    stored_bytes: int | None = None

    def __post_init__(self) -> None:
        # Plugins may still pass a torch.dtype: normalise to the short name.
        object.__setattr__(self, "dtype", dtypes.name_of(self.dtype))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        if self.stored_bytes is not None:
            return self.stored_bytes
        return self.numel * dtypes.itemsize(self.dtype)


@dataclass(frozen=True)
class TensorKind:
    """One row of the table. Layer tensors are named `layers.{i}.` + `meta` (`blk.{i}.` + `gguf`)."""

    meta: str
    hf: str
    gguf: str
    per_layer: bool
    split_dim: int | None
    quantizable: bool
    rotary: str | None  # "q": rows permuted by n_heads, "k": by n_kv_heads
    dims: tuple[str, ...]  # names in DIMS

    def shape(self, args: ModelArgs) -> Shape:
        return tuple(DIMS[d](args) for d in self.dims)


DIMS: dict[str, Callable[[ModelArgs], int]] = {
    "vocab": lambda a: a.vocab_size,
    "dim": lambda a: a.dim,
    "q": lambda a: a.n_heads * a.head_dim,
    "kv": lambda a: a.kv_heads * a.head_dim,
    "ffn": lambda a: a.hidden_dim,
}

# In Meta's state-dict order: embeddings, then per layer, then norm and output.
# fmt: off
TENSORS: tuple[TensorKind, ...] = (
    # Meta name, HF name, GGUF name, per layer, MP split dim, quantizable, rotary, shape
    TensorKind("tok_embeddings.weight", "model.embed_tokens.weight", "token_embd.weight", False, 1, False, None, ("vocab", "dim")),
    TensorKind("attention.wq.weight", "self_attn.q_proj.weight", "attn_q.weight", True, 0, True, "q", ("q", "dim")),
    TensorKind("attention.wk.weight", "self_attn.k_proj.weight", "attn_k.weight", True, 0, True, "k", ("kv", "dim")),
    TensorKind("attention.wv.weight", "self_attn.v_proj.weight", "attn_v.weight", True, 0, True, None, ("kv", "dim")),
    TensorKind("attention.wo.weight", "self_attn.o_proj.weight", "attn_output.weight", True, 1, True, None, ("dim", "q")),
    TensorKind("feed_forward.w1.weight", "mlp.gate_proj.weight", "ffn_gate.weight", True, 0, True, None, ("ffn", "dim")),
    TensorKind("feed_forward.w2.weight", "mlp.down_proj.weight", "ffn_down.weight", True, 1, True, None, ("dim", "ffn")),
    TensorKind("feed_forward.w3.weight", "mlp.up_proj.weight", "ffn_up.weight", True, 0, True, None, ("ffn", "dim")),
    TensorKind("attention_norm.weight", "input_layernorm.weight", "attn_norm.weight", True, None, False, None, ("dim",)),
    TensorKind("ffn_norm.weight", "post_attention_layernorm.weight", "ffn_norm.weight", True, None, False, None, ("dim",)),
    TensorKind("norm.weight", "model.norm.weight", "output_norm.weight", False, None, False, None, ("dim",)),
    TensorKind("output.weight", "lm_head.weight", "output.weight", False, 0, False, None, ("vocab", "dim")),
)
# fmt: on

_LAYER = {k.meta: k for k in TENSORS if k.per_layer}
_TOP = {k.meta: k for k in TENSORS if not k.per_layer}
_META_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF_LAYER_BACK = {k.hf: k for k in _LAYER.values()}
_HF_TOP_BACK = {k.hf: k for k in _TOP.values()}
_GGUF_LAYER_BACK = {k.gguf: k for k in _LAYER.values()}
_GGUF_TOP_BACK = {k.gguf: k for k in _TOP.values()}

# Tensors some checkpoints carry that hold no weights (every loader recomputes them):
# HF's rotary inverse frequencies, Meta's Llama 1 `rope.freqs`, GGUF's `rope_freqs`.
HF_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
META_IGNORED = frozenset({"rope.freqs"})


def kind_of(meta_name: str) -> TensorKind | None:
    """The table row of a Meta name (None when it is not a Llama weight)."""
    if meta_name in _TOP:
        return _TOP[meta_name]
    match = _META_LAYER.match(meta_name)
    return _LAYER.get(match.group(2)) if match else None


def layer_of(meta_name: str) -> int | None:
    match = _META_LAYER.match(meta_name)
    return int(match.group(1)) if match else None


def meta_names(args: ModelArgs) -> Iterator[tuple[str, TensorKind]]:
    """Every tensor of a shape in Meta's order, with its row."""
    yield "tok_embeddings.weight", _TOP["tok_embeddings.weight"]
    for i in range(args.n_layers):
        for kind in _LAYER.values():
            yield f"layers.{i}.{kind.meta}", kind
    yield "norm.weight", _TOP["norm.weight"]
    yield "output.weight", _TOP["output.weight"]


def expected_shapes(args: ModelArgs) -> dict[str, Shape]:
    """Every Meta tensor of this shape with its full (merged) shape, in Meta's order."""
    return {name: kind.shape(args) for name, kind in meta_names(args)}


def meta_to_hf(meta_name: str) -> str | None:
    kind = kind_of(meta_name)
    if kind is None:
        return None
    layer = layer_of(meta_name)
    return kind.hf if layer is None else f"model.layers.{layer}.{kind.hf}"


def hf_to_meta(hf_name: str) -> str | None:
    if hf_name in _HF_TOP_BACK:
        return _HF_TOP_BACK[hf_name].meta
    match = _HF_LAYER.match(hf_name)
    if match and match.group(2) in _HF_LAYER_BACK:
        return f"layers.{match.group(1)}.{_HF_LAYER_BACK[match.group(2)].meta}"
    return None


def meta_to_gguf(meta_name: str) -> str | None:
    kind = kind_of(meta_name)
    if kind is None:
        return None
    layer = layer_of(meta_name)
    return kind.gguf if layer is None else f"blk.{layer}.{kind.gguf}"


def gguf_to_meta(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_TOP_BACK:
        return _GGUF_TOP_BACK[gguf_name].meta
    match = _GGUF_LAYER.match(gguf_name)
    if match and match.group(2) in _GGUF_LAYER_BACK:
        return f"layers.{match.group(1)}.{_GGUF_LAYER_BACK[match.group(2)].meta}"
    return None


def split_dim(meta_name: str) -> int | None:
    """Model-parallel dim of a Meta tensor: 0 column-parallel, 1 row-parallel, None replicated."""
    kind = kind_of(meta_name)
    return kind.split_dim if kind else None


def is_quantizable(meta_name: str) -> bool:
    """True for the seven linear projections of each block (embeddings, norms, head stay as they are)."""
    kind = kind_of(meta_name)
    return bool(kind and kind.quantizable)


def rotary_heads(meta_name: str, args: ModelArgs) -> int | None:
    """Heads to permute rows by between Meta and HF layouts (wq: n_heads, wk: KV heads), else None."""
    kind = kind_of(meta_name)
    if kind is None or kind.rotary is None:
        return None
    return args.n_heads if kind.rotary == "q" else args.kv_heads


def module_path(meta_name: str) -> str:
    """`layers.0.attention.wq.weight` -> `layers.0.attention.wq` (the nn.Module holding it)."""
    return meta_name.removesuffix(".weight")


def param_count(args: ModelArgs) -> int:
    """Parameters of a Llama shape (embedding and output head counted separately)."""
    return sum(math.prod(shape) for shape in expected_shapes(args).values())
