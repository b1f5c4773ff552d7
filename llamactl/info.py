"""What a checkpoint is and what it will cost in memory, computed from metadata alone."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from llamactl.checkpoint import CheckpointReader, TensorInfo
from llamactl.checkpoint.sharding import expected_shapes
from llamactl.config import ModelArgs

# bitsandbytes' 4-bit layout: one absmax per block of 64 weights; with double quantization
# those absmax are themselves int8 with one fp32 scale per 256 of them, plus a 256-entry code.
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256


def is_quantizable(name: str) -> bool:
    """Linear weights inside the layers; embeddings, norms and the output head stay 16-bit."""
    return (
        name.startswith("layers.") and name.endswith(".weight") and ("attention.w" in name or "feed_forward.w" in name)
    )


def kv_cache_bytes(args: ModelArgs, tokens: int, batch: int = 1, bytes_per_element: int = 2) -> int:
    """2 (K and V) x layers x KV heads x head dim x tokens x batch x bytes per element."""
    return 2 * args.n_layers * args.kv_heads * args.head_dim * tokens * batch * bytes_per_element


def int8_weight_bytes(info: TensorInfo) -> int:
    """LLM.int8: one int8 per weight plus an fp32 scale (SCB) per output row."""
    return info.numel + 4 * info.shape[0]


def nf4_weight_bytes(info: TensorInfo, double_quant: bool = True) -> int:
    """Packed 4-bit weights plus absmax (int8 + nested fp32 scales + code when double-quantized)."""
    blocks = math.ceil(info.numel / NF4_BLOCK)
    packed = (info.numel + 1) // 2
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 * 256 + 4


def weight_bytes(infos: list[TensorInfo], scheme: str) -> int:
    """Bytes of weights at 16-bit, or with the layers' linear weights quantized."""
    total = 0
    for info in infos:
        if scheme == "int8" and is_quantizable(info.name):
            total += int8_weight_bytes(info)
        elif scheme == "nf4" and is_quantizable(info.name):
            total += nf4_weight_bytes(info)
        else:
            total += 2 * info.numel
    return total


@dataclass
class ModelInfo:
    """The `info` report; field names are the --json schema."""

    path: str
    format: str
    attention: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    max_seq_len: int
    rope_theta: float
    norm_eps: float
    dtype: str
    parameters: int
    files: int
    bytes_on_disk: int
    tokenizer: str | None
    quantization: dict[str, Any] | None
    ctx: int
    memory: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_info(reader: CheckpointReader, ctx: int | None = None) -> ModelInfo:
    """Describe a checkpoint without loading its weights."""
    args = reader.args
    ctx = ctx or args.max_seq_len
    quantization = reader.quantization
    if quantization is None:
        infos = reader.tensor_infos()
        dtypes = Counter(str(i.dtype).removeprefix("torch.") for i in infos)
        dtype = dtypes.most_common(1)[0][0] if dtypes else "unknown"
    else:  # quantized tensors are not in the canonical layout: estimate from the shape
        from llamactl.quantize import QuantSpec, checkpoint_quant_stats

        infos = [TensorInfo(name, shape, torch.float16) for name, shape in expected_shapes(args).items()]
        spec = QuantSpec.from_hf_config(quantization, str(reader.path / "config.json"))
        stats = checkpoint_quant_stats(reader.files)
        dtype = spec.scheme
        quantization = dict(quantization) | {
            "scheme": spec.describe(),
            "bits_per_weight": round(stats.bits_per_weight, 4),
            "model_bits_per_weight": round(stats.model_bits_per_weight, 4),
        }
    kv_token = kv_cache_bytes(args, 1)
    memory = {
        "weights_fp16": weight_bytes(infos, "fp16"),
        "weights_int8": weight_bytes(infos, "int8"),
        "weights_nf4": weight_bytes(infos, "nf4"),
        "kv_cache_per_token": kv_token,
        "kv_cache_at_ctx": kv_token * ctx,
    }
    return ModelInfo(
        path=str(reader.path),
        format=reader.format,
        attention=args.attention_kind,
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        hidden_dim=args.hidden_dim,
        vocab_size=args.vocab_size,
        max_seq_len=args.max_seq_len,
        rope_theta=args.rope_theta,
        norm_eps=args.norm_eps,
        dtype=dtype,
        parameters=sum(i.numel for i in infos),
        files=len(reader.files),
        bytes_on_disk=sum(f.stat().st_size for f in reader.files),
        tokenizer=str(reader.tokenizer_path) if reader.tokenizer_path else None,
        quantization=quantization,
        ctx=ctx,
        memory=memory,
    )
