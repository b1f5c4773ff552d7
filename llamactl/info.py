"""What a checkpoint is and what it will cost in memory, computed from metadata alone.

Everything comes from the reader's tensor infos (quantized tensors carry their scheme and
stored size), so a quantized checkpoint needs no branch of its own. A reader whose file
stores tensors in types of its own (GGUF's ggml types, dequantized on reading) also offers
`storage()`: the per-type tensor counts and bits per weight, reported as `storage`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from llamactl import dtypes, estimate
from llamactl.checkpoint import CheckpointReader
from llamactl.checkpoint.base import main_dtype, trained_context
from llamactl.home import disk_bytes, model_files
from llamactl.layout import TensorInfo
from llamactl.quantize import QuantSpec, storage
from llamactl.quantize.quality import QuantStats

# The storage schemes `info` estimates weight memory for: 16-bit, then one per bit width.
ESTIMATED_SCHEMES = ("int8", "nf4")


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
    files: int  # every file of the model (as `list` and `show` count them)
    bytes_on_disk: int
    weight_files: int  # the files holding the weights
    weight_bytes_on_disk: int
    tokenizer: str | None
    quantization: dict[str, Any] | None
    ctx: int
    memory: dict[str, int] = field(default_factory=dict)
    tp: int = 1  # the memory_per_rank figures are for this many tensor-parallel ranks
    memory_per_rank: dict[str, int] = field(default_factory=dict)
    gpus: dict[str, dict[str, int | None]] = field(default_factory=dict)  # GPU size -> scheme -> fewest --tp
    storage: dict[str, Any] | None = None  # GGUF: container, tensor_types, bits_per_weight...
    chat_template: str = "llama-2-chat"  # the template chat uses without --template
    chat_template_source: str = ""  # which one that is, in words
    trained_context: int | None = None  # None: the files do not say (max_seq_len is then a default)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantization_summary(reader: CheckpointReader, infos: list[TensorInfo]) -> dict[str, Any] | None:
    """Scheme, description and bits per weight of a quantized checkpoint (None when plain)."""
    if reader.quant is None:
        return None
    stats = QuantStats.compare(infos, infos)
    schemes = Counter(i.scheme for i in infos if i.scheme is not None)
    return {
        **reader.quant.to_dict(),
        "description": reader.quant.describe(),
        "tensors": dict(schemes),
        "bits_per_weight": round(stats.bits_per_weight, 4),
        "model_bits_per_weight": round(stats.model_bits_per_weight, 4),
    }


def memory_estimates(infos: list[TensorInfo], ctx: int, args: Any, tp: int = 1) -> dict[str, int]:
    """Weights at 16-bit and per scheme, the KV cache per token and at `ctx` (fp16).

    `tp` > 1: what each of `tp` tensor-parallel ranks holds (1/tp of every split tensor and
    of the KV heads; norms replicated).
    """
    infos = estimate.rank_infos(infos, tp)
    memory = {"weights_fp16": estimate.weight_bytes(infos)}
    for scheme in ESTIMATED_SCHEMES:
        spec = QuantSpec(scheme)
        memory[f"weights_{scheme}"] = estimate.weight_bytes(infos, _Sized(spec))
    kv_token = estimate.kv_cache_bytes(args, 1, tp=tp)
    return memory | {"kv_cache_per_token": kv_token, "kv_cache_at_ctx": kv_token * ctx}


# GPU memory sizes `info` says the fewest --tp for (24 GB consumer, 40 / 80 GB data-centre).
GPU_SIZES = {"24GB": 24 << 30, "40GB": 40 << 30, "80GB": 80 << 30}


def gpus_needed(infos: list[TensorInfo], ctx: int, args: Any) -> dict[str, dict[str, int | None]]:
    """For each GPU size and weight storage: the fewest --tp whose weights + KV @ ctx fit one GPU."""
    choices = estimate.tp_choices(args)
    per_tp: dict[int, dict[str, int]] = {}  # each --tp's estimates, computed once

    def memory(tp: int) -> dict[str, int]:
        if tp not in per_tp:
            per_tp[tp] = memory_estimates(infos, ctx, args, tp)
        return per_tp[tp]

    out: dict[str, dict[str, int | None]] = {}
    for gpu, size in GPU_SIZES.items():
        out[gpu] = {}
        for scheme in ("fp16", *ESTIMATED_SCHEMES):
            key = f"weights_{scheme}"

            def need(tp: int, key: str = key) -> int:
                return memory(tp)[key] + memory(tp)["kv_cache_at_ctx"]

            out[gpu][scheme] = estimate.smallest_tp(need, choices, size)
    return out


@dataclass(frozen=True)
class _Sized:
    """A spec seen as estimate.StoredSize (its backend knows the bytes per shape)."""

    spec: QuantSpec

    @property
    def name(self) -> str:
        return self.spec.scheme

    def stored_bytes(self, shape: tuple[int, ...]) -> int:
        return storage(self.spec).stored_bytes(self.spec, shape)


def _torch_name(dtype: str) -> str:
    """'bf16' -> 'bfloat16': info and list print dtypes as torch and transformers spell them."""
    return dtypes.lookup(dtype).torch if dtype != "unknown" else dtype


def storage_of(reader: CheckpointReader) -> dict[str, Any] | None:
    """The reader's own storage summary (GGUF), or None for formats that store plain dtypes."""
    storage = getattr(reader, "storage", None)
    return storage() if callable(storage) else None


def _dtype(reader: CheckpointReader, infos: list[TensorInfo], storage: dict[str, Any] | None) -> str:
    """A GGUF's main ggml type (Q4_K...), a quantized scheme's name, else the main torch dtype."""
    main = storage.get("main_type") if storage else None
    if main is not None and main not in ("F32", "F16", "BF16"):
        return str(main)
    if reader.quant is not None:
        return reader.quant.scheme
    return _torch_name(main_dtype(infos))


def model_info(reader: CheckpointReader, ctx: int | None = None, tp: int = 1) -> ModelInfo:
    """Describe a checkpoint without loading its weights (`tp`: also per tensor-parallel rank)."""
    args = reader.args
    estimate.check_tp(args, tp)
    ctx = ctx or args.max_seq_len
    infos = reader.tensor_infos()
    storage = storage_of(reader)
    everything = model_files(reader.path)
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
        trained_context=trained_context(reader),
        rope_theta=args.rope_theta,
        norm_eps=args.norm_eps,
        dtype=_dtype(reader, infos, storage),
        parameters=sum(i.numel for i in infos),
        files=len(everything),
        bytes_on_disk=disk_bytes(everything),
        weight_files=len(reader.files),
        weight_bytes_on_disk=disk_bytes(list(reader.files)),
        tokenizer=str(reader.tokenizer_path) if reader.tokenizer_path else None,
        quantization=quantization_summary(reader, infos),
        ctx=ctx,
        memory=memory_estimates(infos, ctx, args),
        storage=storage,
        **_template_fields(reader),
        tp=tp,
        memory_per_rank=memory_estimates(infos, ctx, args, tp) if tp > 1 else {},
        gpus=gpus_needed(infos, ctx, args),
    )


def _template_fields(reader: CheckpointReader) -> dict[str, str]:
    """The chat template a chat with this checkpoint uses by default, and where it comes from."""
    from llamactl.templates import choose_template, describe_template

    template = choose_template(None, getattr(reader, "chat_template", None), str(reader.path))
    return {"chat_template": template.name, "chat_template_source": describe_template(template)}


def describe_storage(storage: dict[str, Any]) -> str:
    """'GGUF v3: Q4_1 ×210, F32 ×61, Q8_0 ×1; 5.04 bits per weight' (info and show print it)."""
    types = ", ".join(f"{name} ×{count}" for name, count in storage.get("tensor_types", {}).items())
    line = f"{storage.get('container', 'stored')}: {types}; {storage.get('bits_per_weight', 0):g} bits per weight"
    return line + (", tied embeddings" if storage.get("tied_embeddings") else "")
