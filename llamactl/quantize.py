"""int8 (LLM.int8) and 4-bit (nf4 / fp4) quantization through bitsandbytes' own functions.

Three jobs, all keyed on one `QuantSpec`:
- tensors: `quantize_tensor` turns one weight into exactly the entries transformers'
  bitsandbytes integration saves (`weight`, `SCB`, `weight_format` for 8-bit; `weight` plus the
  packed `quant_state` entries for 4-bit), and `dequantize_parts` inverts it;
- the model: `QuantizedLinear` wraps bitsandbytes' own Linear8bitLt / Linear4bit, so llamactl
  computes what transformers computes; `quantize_model` (quantize on load) and
  `load_quantized_state` (read a quantized HF checkpoint) install them;
- the report: sizes and bits per weight (`QuantStats`) and quality (`compare_logits`).

Quantized weights are always stored in Hugging Face's row order: wq / wk are permuted for HF
*before* quantizing (4-bit blocks run over the flattened rows, so the order changes the bytes).
In llamactl's Meta-layout model the same bytes are used and the output features are gathered
back into Meta's order (`out_index`), which is exact.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from llamactl.checkpoint.keymap import (
    hf_to_meta_name,
    meta_to_hf_name,
    permute_for_hf,
    rotary_heads,
    unpermute_from_hf,
)
from llamactl.config import ModelArgs
from llamactl.dtypes import FLOAT_NAMES, to_torch
from llamactl.errors import CheckpointError, ConfigError, MissingDependencyError, UsageError
from llamactl.plugins import get_registry, hookimpl

SUPPORTED_BITS = (8, 4)
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = {name: to_torch(name) for name in FLOAT_NAMES}  # bitsandbytes computes in any of them
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
INSTALL_HINT = "pip install 'bitsandbytes>=0.45'"
# Only the seven projections of each block are quantized: embeddings, norms and the output
# head stay as they are, as transformers does (it never converts lm_head or nn.Embedding).
_QUANTIZABLE = re.compile(r"^layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight$")
_QS_KEY = "weight.quant_state.bitsandbytes__"

# A short English sample for the quality report when no --eval file is given.
BUILTIN_SAMPLE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friends. One day, she saw a big red ball under a tree. She ran to the ball and picked it up. Her mom "
    'smiled and said, "Be careful, Lily, and share the ball with your friends." The sun was warm and the '
    "sky was blue. Lily and her friends played with the ball until it was time to go home for dinner. "
    "The history of science is the study of how people came to understand the natural world. Early "
    "scholars observed the stars, measured the seasons and wrote down what they saw, so that others could "
    "test their ideas and build on them."
)


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize to; maps 1:1 onto transformers' BitsAndBytesConfig."""

    bits: int
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "bf16"
    threshold: float = 6.0

    def validate(self) -> QuantSpec:
        if self.bits not in SUPPORTED_BITS:
            raise UsageError(f"--bits {self.bits}: unsupported; choose one of: {', '.join(map(str, SUPPORTED_BITS))}")
        if self.quant_type not in QUANT_TYPES:
            raise UsageError(f"--quant-type {self.quant_type}: unsupported; choose one of: {', '.join(QUANT_TYPES)}")
        if self.blocksize not in BLOCKSIZES:
            raise UsageError(
                f"--blocksize {self.blocksize}: unsupported; choose one of: {', '.join(map(str, BLOCKSIZES))}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise UsageError(f"--compute-dtype {self.compute_dtype}: choose one of: {', '.join(COMPUTE_DTYPES)}")
        if self.threshold < 0:
            raise UsageError(f"--int8-threshold {self.threshold}: must be >= 0")
        return self

    @property
    def scheme(self) -> str:
        return "int8" if self.bits == 8 else self.quant_type

    def describe(self) -> str:
        """One line for tables and `info`, e.g. `nf4 (double quant, blocksize 64, compute bf16)`."""
        if self.bits == 8:
            return f"int8 (LLM.int8, outlier threshold {self.threshold:g})"
        dq = "double quant" if self.double_quant else "no double quant"
        return f"{self.quant_type} ({dq}, blocksize {self.blocksize}, compute {self.compute_dtype})"

    def to_hf_config(self, skip_modules: Sequence[str] | None = None) -> dict[str, Any]:
        """`quantization_config` exactly as transformers' BitsAndBytesConfig.to_dict() writes it."""
        four = self.bits == 4
        return {
            "_load_in_4bit": four,
            "_load_in_8bit": not four,
            "bnb_4bit_compute_dtype": _DTYPE_NAMES[COMPUTE_DTYPES[self.compute_dtype]] if four else "float32",
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": self.quant_type if four else "fp4",
            "bnb_4bit_use_double_quant": self.double_quant if four else False,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": list(skip_modules) if skip_modules else None,
            "llm_int8_threshold": self.threshold,
            "load_in_4bit": four,
            "load_in_8bit": not four,
            "quant_method": "bitsandbytes",
        }

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], where: str = "config.json") -> QuantSpec:
        """Read a `quantization_config`; anything but bitsandbytes int8 / 4-bit is an error."""
        if config.get("quant_method") != "bitsandbytes":
            raise ConfigError(
                f"{where}: quantization method {config.get('quant_method')!r} is not supported (only bitsandbytes)"
            )
        four = bool(config.get("load_in_4bit") or config.get("_load_in_4bit"))
        eight = bool(config.get("load_in_8bit") or config.get("_load_in_8bit"))
        if four == eight:
            raise ConfigError(f"{where}: quantization_config must set exactly one of load_in_4bit / load_in_8bit")
        dtype_names = {v: k for k, v in _DTYPE_NAMES.items()}
        compute = dtype_names.get(str(config.get("bnb_4bit_compute_dtype") or "float32"), torch.float32)
        spec = cls(
            bits=4 if four else 8,
            quant_type=str(config.get("bnb_4bit_quant_type") or "nf4") if four else "nf4",
            double_quant=bool(config.get("bnb_4bit_use_double_quant", False)) if four else False,
            compute_dtype={v: k for k, v in COMPUTE_DTYPES.items()}[compute],
            threshold=float(config.get("llm_int8_threshold", 6.0)),
        )
        try:
            return spec.validate()
        except UsageError as exc:
            raise ConfigError(f"{where}: {exc}") from None


# ----------------------------------------------------------------------------- bitsandbytes


def require_bitsandbytes(device: torch.device | str | None = None) -> ModuleType:
    """Import bitsandbytes lazily; check it can quantize on `device` (a one-line error if not)."""
    bnb_logger = logging.getLogger("bitsandbytes")
    level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)  # its CPU backend warns at import about an optional extra
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional
        import bitsandbytes.nn
    except ImportError as exc:
        raise MissingDependencyError(
            f"bitsandbytes is not installed ({exc}); install it with: {INSTALL_HINT}"
        ) from None
    finally:
        bnb_logger.setLevel(level)
    # LLM.int8 quantizes fp32/bf16 activations from fp16 and logs so on every call: expected here.
    matmul_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _quiet_cast not in matmul_logger.filters:
        matmul_logger.addFilter(_quiet_cast)
    if device is not None:
        _probe_backend(bnb, torch.device(device))
    return bnb


def _quiet_cast(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _probe_backend(bnb: ModuleType, device: torch.device) -> None:
    version = getattr(bnb, "__version__", "?")
    probe = torch.linspace(-1, 1, 64, device=device).view(1, 64)
    try:
        bnb.functional.quantize_4bit(probe, blocksize=64, quant_type="nf4")
        bnb.functional.int8_vectorwise_quant(probe.half())
    except Exception as exc:  # any backend failure: missing native library, unsupported device...
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MissingDependencyError(
            f"bitsandbytes {version} has no usable backend on {device.type} ({why[:200]}); "
            f"install a build for this device with: {INSTALL_HINT}"
        ) from None


# ----------------------------------------------------------------------------- tensors


def is_quantizable(meta_name: str) -> bool:
    """True for the seven linear projections of each block (Meta names)."""
    return bool(_QUANTIZABLE.match(meta_name))


def module_name(hf_name: str) -> str:
    """`model.layers.0.mlp.down_proj.weight` -> `model.layers.0.mlp.down_proj`."""
    return hf_name.removesuffix(".weight")


def quantize_tensor(
    weight: torch.Tensor, spec: QuantSpec, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Quantize one [out, in] weight; returns the module-relative entries bitsandbytes saves.

    8-bit follows Int8Params: cast to fp16, `int8_vectorwise_quant` -> `weight` (int8 CB),
    `SCB` (fp32 row absmax) and `weight_format` (0 = row-major). 4-bit follows Params4bit:
    `quantize_4bit` in the weight's own dtype, then `QuantState.as_dict(packed=True)` under
    `weight.` (absmax, quant_map, nested_*, and the JSON `quant_state.bitsandbytes__<type>`).
    Results are on the CPU, ready to be written.
    """
    bnb = require_bitsandbytes()
    w = weight.detach().contiguous().to(device or weight.device)
    if spec.bits == 8:
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
        return {"weight": cb.cpu(), "SCB": scb.cpu(), "weight_format": torch.tensor(0, dtype=torch.uint8)}
    packed, state = bnb.functional.quantize_4bit(
        w,
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type=spec.quant_type,
        quant_storage=torch.uint8,
    )
    parts = {"weight": packed.cpu()}
    for key, value in state.as_dict(packed=True).items():
        parts[f"weight.{key}"] = value.detach().cpu()
    return parts


def parts_scheme(parts: Mapping[str, torch.Tensor]) -> str | None:
    """'int8', 'nf4', 'fp4' from the entries present, None for a plain weight."""
    if "SCB" in parts:
        return "int8"
    for key in parts:
        if key.startswith(_QS_KEY):
            return key.removeprefix(_QS_KEY)
    return None


def quant_state_from_parts(parts: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> Any:
    """bitsandbytes' QuantState from saved 4-bit entries (what Params4bit.from_prequantized does)."""
    bnb = require_bitsandbytes()
    stats = {k.removeprefix("weight."): v for k, v in parts.items() if k != "weight"}
    return bnb.functional.QuantState.from_dict(qs_dict=stats, device=torch.device(device))


def dequantize_parts(parts: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [out, in] weight the saved entries stand for, via bitsandbytes' dequantize functions."""
    bnb = require_bitsandbytes()
    scheme = parts_scheme(parts)
    if scheme == "int8":
        return bnb.functional.int8_vectorwise_dequant(parts["weight"], parts["SCB"]).to(dtype)
    if scheme in QUANT_TYPES:
        state = quant_state_from_parts(parts, parts["weight"].device)
        return bnb.functional.dequantize_4bit(parts["weight"], state).to(dtype)
    return parts["weight"].to(dtype)


def parts_nbytes(parts: Mapping[str, torch.Tensor]) -> int:
    """Bytes stored for one quantized weight: data, scales, double-quant constants, metadata."""
    return sum(t.numel() * t.element_size() for t in parts.values())


def matches_skip(meta_name: str, patterns: Sequence[str]) -> list[str]:
    """The --skip patterns (fnmatch) that match a tensor, by Meta name, HF name or module name."""
    hf = meta_to_hf_name(meta_name) or ""
    names = {meta_name, meta_name.removesuffix(".weight"), hf, module_name(hf)}
    return [p for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in names if n)]


# ----------------------------------------------------------------------------- model


class QuantizedLinear(nn.Module):
    """A bitsandbytes Linear8bitLt / Linear4bit holding HF-ordered rows.

    `out_index` gathers the output features back into Meta's q/k order (None: same order).
    """

    def __init__(self, inner: nn.Module, scheme: str, out_index: torch.Tensor | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.scheme = scheme
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.register_buffer("out_index", out_index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)  # [..., out] in HF row order
        return y if self.out_index is None else y.index_select(-1, self.out_index)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight and its statistics as held in memory."""
        weight = self.inner.weight
        total = weight.numel() * weight.element_size()
        if self.scheme == "int8":
            scb = weight.SCB if getattr(weight, "SCB", None) is not None else self.inner.state.SCB
            return total + scb.numel() * scb.element_size()
        state = weight.quant_state
        total += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * state.code.element_size()
        if state.nested:
            total += sum(t.numel() * t.element_size() for t in (state.state2.absmax, state.state2.code))
        return total

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, scheme={self.scheme}"

    @classmethod
    def from_parts(
        cls,
        parts: Mapping[str, torch.Tensor],
        spec: QuantSpec,
        shape: Sequence[int],
        device: torch.device | str = "cpu",
        out_index: torch.Tensor | None = None,
    ) -> QuantizedLinear:
        """Build from saved entries, as transformers' Bnb8bitDeserialize / Bnb4bitDeserialize do."""
        bnb = require_bitsandbytes()
        out_features, in_features = int(shape[0]), int(shape[1])
        device = torch.device(device)
        scheme = parts_scheme(parts)
        with torch.device("meta"):
            if scheme == "int8":
                inner = bnb.nn.Linear8bitLt(
                    in_features, out_features, bias=False, has_fp16_weights=False, threshold=spec.threshold
                )
            else:
                inner = bnb.nn.Linear4bit(
                    in_features,
                    out_features,
                    bias=False,
                    compute_dtype=COMPUTE_DTYPES[spec.compute_dtype],
                    compress_statistics=spec.double_quant,
                    quant_type=spec.quant_type,
                )
        if scheme == "int8":
            inner.weight = bnb.nn.Int8Params(
                parts["weight"], requires_grad=False, has_fp16_weights=False, SCB=parts["SCB"]
            ).to(device)
        elif scheme in QUANT_TYPES:
            stats = {k.removeprefix("weight."): v for k, v in parts.items() if k != "weight"}
            inner.weight = bnb.nn.Params4bit.from_prequantized(
                data=parts["weight"], quantized_stats=stats, requires_grad=False, device=device, module=inner
            )
        else:
            raise CheckpointError(f"quantized weight of shape {list(shape)} has neither SCB nor a quant_state")
        inner.requires_grad_(False)
        if scheme != "int8" and (out_features % 32 or in_features % spec.blocksize or spec.compute_dtype == "fp32"):
            # bitsandbytes' AVX512-BF16 CPU kernel computes in bf16 whatever the compute dtype, and
            # repacks weights in tiles of 32 rows x one block, failing otherwise (stories260K's FFN
            # is 172 wide): use its dequantize-then-matmul path for fp32 compute or such shapes.
            inner.support_avx512bf16_for_cpu = False
        index = out_index.to(device) if out_index is not None else None
        return cls(inner, scheme, index).eval()  # inference only: bnb's training paths differ

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, spec: QuantSpec, heads: int | None = None, device: torch.device | str | None = None
    ) -> QuantizedLinear:
        """Quantize a Meta-layout weight (permuted for HF first when `heads` is given)."""
        device = torch.device(device) if device is not None else weight.device
        hf_weight = permute_for_hf(weight, heads) if heads else weight
        parts = quantize_tensor(hf_weight, spec, device)
        out_index = hf_to_meta_index(weight.shape[0], heads) if heads else None
        return cls.from_parts(parts, spec, weight.shape, device, out_index)


def hf_to_meta_index(rows: int, heads: int) -> torch.Tensor:
    """Indices i such that meta_out = hf_out[..., i] for a q/k projection."""
    return unpermute_from_hf(torch.arange(rows).view(rows, 1), heads).flatten()


def _linear_names(model: nn.Module) -> list[str]:
    return [
        f"{name}.weight"
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and is_quantizable(f"{name}.weight")
    ]


def quantize_model(
    model: nn.Module, spec: QuantSpec, device: torch.device | str | None = None, skip: Sequence[str] = ()
) -> int:
    """Replace the block projections of a loaded Transformer by QuantizedLinear, in place.

    Quantize-on-load for `chat|generate|bench --bits`: the bytes are those `llamactl quantize`
    would write for the same weights. Returns the number of layers quantized.
    """
    spec.validate()
    model.unfuse_projections()  # type: ignore[operator]  # fused weights would bypass the quantized layers
    args: ModelArgs = model.args  # type: ignore[assignment]
    require_bitsandbytes(device or next(model.parameters()).device)
    count = 0
    for name in _linear_names(model):
        if matches_skip(name, skip):
            continue
        path = name.removesuffix(".weight")
        linear = model.get_submodule(path)
        heads = rotary_heads(name, args.n_heads, args.kv_heads)
        model.set_submodule(path, QuantizedLinear.from_weight(linear.weight.data, spec, heads, device))
        del linear
        count += 1
    return count


def group_quantized(names: Iterable[str]) -> dict[str, list[str]]:
    """HF module name -> its saved entries, for every quantized module among `names`."""
    names = list(names)
    modules = {n.removesuffix(".SCB") for n in names if n.endswith(".SCB")}
    modules |= {n.split(".weight.quant_state.")[0] for n in names if ".weight.quant_state.bitsandbytes__" in n}
    groups: dict[str, list[str]] = {m: [] for m in modules}
    for n in names:
        for m in (n.rsplit(".", 1)[0], n.split(".weight.")[0], n.removesuffix(".weight")):
            if m in groups and n.startswith(m + "."):
                groups[m].append(n)
                break
    return groups


def load_quantized_state(
    model: nn.Module, files: Sequence[Path], spec: QuantSpec, device: torch.device | str, dtype: torch.dtype
) -> None:
    """Load a bitsandbytes HF checkpoint (safetensors `files`) into a Meta-layout Transformer.

    Quantized modules become QuantizedLinear; every other tensor is mapped to its Meta name
    (q/k un-permuted), cast to `dtype` and assigned. Works on a model built on the meta device.
    """
    from safetensors import SafetensorError, safe_open

    args: ModelArgs = model.args  # type: ignore[assignment]
    require_bitsandbytes(device)
    plain: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix != ".safetensors":
            raise CheckpointError(f"{file}: a quantized checkpoint must be stored as safetensors")
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                groups = group_quantized(f.keys())
                grouped = {n for entries in groups.values() for n in entries}
                for mod, entries in groups.items():
                    _install_quantized(
                        model, args, mod, {n[len(mod) + 1 :]: f.get_tensor(n) for n in entries}, spec, device, file
                    )
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if name not in grouped:
                        _add_plain(plain, args, name, f.get_tensor(name), dtype, device, file)
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: unreadable safetensors file: {exc}") from None
    missing, unexpected = model.load_state_dict(plain, strict=False, assign=True)
    missing = [m for m in missing if ".inner." not in m]
    if missing:
        raise CheckpointError(f"{files[0].parent}: tensor {missing[0]} is missing ({len(missing)} missing)")
    assert not unexpected, unexpected


def _install_quantized(
    model: nn.Module,
    args: ModelArgs,
    module: str,
    parts: dict[str, torch.Tensor],
    spec: QuantSpec,
    device: torch.device | str,
    file: Path,
) -> None:
    meta_name = hf_to_meta_name(module + ".weight")
    if meta_name is None or not is_quantizable(meta_name):
        raise CheckpointError(f"{file}: quantized tensor {module}.weight is not a block projection")
    path = meta_name.removesuffix(".weight")
    linear = model.get_submodule(path)
    shape = (linear.out_features, linear.in_features)
    heads = rotary_heads(meta_name, args.n_heads, args.kv_heads)
    index = hf_to_meta_index(shape[0], heads) if heads else None
    try:
        new = QuantizedLinear.from_parts(parts, spec, shape, device, index)
    except (ValueError, KeyError, RuntimeError, AssertionError) as exc:
        raise CheckpointError(f"{file}: quantized tensor {module}.weight is malformed: {exc}") from None
    model.set_submodule(path, new)


def _add_plain(
    plain: dict[str, torch.Tensor],
    args: ModelArgs,
    name: str,
    tensor: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device | str,
    file: Path,
) -> None:
    meta_name = hf_to_meta_name(name)
    if meta_name is None:
        raise CheckpointError(f"{file}: unexpected tensor {name}")
    heads = rotary_heads(meta_name, args.n_heads, args.kv_heads)
    if heads:
        tensor = unpermute_from_hf(tensor, heads)
    plain[meta_name] = tensor.to(device=device, dtype=dtype)


def quant_scheme(name: str) -> QuantSpec:
    """A quantization scheme registered under `name` (int8, nf4, fp4 or a plugin's QuantSpec)."""
    schemes = get_registry().quantizers()
    if name not in schemes:
        raise UsageError(f"--scheme {name}: unknown quantization scheme; choose one of: {', '.join(sorted(schemes))}")
    spec = schemes[name]
    if not isinstance(spec, QuantSpec):
        raise UsageError(f"--scheme {name}: registered as {type(spec).__name__}, not a llamactl.quantize.QuantSpec")
    return dataclasses.replace(spec).validate()


# ----------------------------------------------------------------------------- report


@dataclass
class QuantStats:
    """Sizes of one quantization run (or of a quantized checkpoint on disk)."""

    tensors_total: int = 0
    tensors_quantized: int = 0
    params_total: int = 0
    params_quantized: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    quantized_bytes_after: int = 0
    skipped: list[str] = field(default_factory=list)

    def add(self, numel: int, before: int, after: int, quantized: bool) -> None:
        self.tensors_total += 1
        self.params_total += numel
        self.bytes_before += before
        self.bytes_after += after
        if quantized:
            self.tensors_quantized += 1
            self.params_quantized += numel
            self.quantized_bytes_after += after

    @property
    def bits_per_weight(self) -> float:
        """Bits per quantized weight, scales and double-quant constants included."""
        return 8 * self.quantized_bytes_after / self.params_quantized if self.params_quantized else 0.0

    @property
    def model_bits_per_weight(self) -> float:
        """Bits per parameter over the whole model (unquantized tensors included)."""
        return 8 * self.bytes_after / self.params_total if self.params_total else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bits_per_weight"] = round(self.bits_per_weight, 4)
        data["model_bits_per_weight"] = round(self.model_bits_per_weight, 4)
        data["compression"] = round(self.bytes_before / self.bytes_after, 4) if self.bytes_after else None
        return data


def checkpoint_quant_stats(files: Sequence[Path]) -> QuantStats:
    """Stats of a quantized safetensors checkpoint from headers only (for `llamactl info`)."""
    from safetensors import safe_open

    stats = QuantStats()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            groups = group_quantized(keys)
            grouped = {n for entries in groups.values() for n in entries}
            for mod, entries in groups.items():
                size = sum(_slice_nbytes(f, e) for e in entries)
                stats.add(_quantized_numel(f, mod, entries), 0, size, quantized=True)
            for name in keys:
                if name not in grouped:
                    size = _slice_nbytes(f, name)
                    stats.add(math.prod(f.get_slice(name).get_shape()), size, size, quantized=False)
    return stats


def _quantized_numel(f: Any, module: str, entries: Sequence[str]) -> int:
    """Weights in one quantized module: int8 keeps the shape, 4-bit records it in its quant_state."""
    state_keys = [e for e in entries if e.startswith(f"{module}.{_QS_KEY}")]
    if not state_keys:
        return math.prod(f.get_slice(f"{module}.weight").get_shape())
    return math.prod(json.loads(bytes(f.get_tensor(state_keys[0]).tolist()))["shape"])


_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _slice_nbytes(f: Any, name: str) -> int:
    piece = f.get_slice(name)
    return math.prod(piece.get_shape()) * _ST_SIZES.get(piece.get_dtype(), 4)


@dataclass
class Quality:
    """Quantized vs unquantized next-token predictions on one text."""

    tokens: int
    perplexity_before: float
    perplexity_after: float
    top1_agreement: float
    mean_kl: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_logits(ref_logits: torch.Tensor, q_logits: torch.Tensor, tokens: torch.Tensor) -> Quality:
    """Perplexities, top-1 agreement and mean KL(ref || quantized) over next-token predictions.

    logits [T, V] for tokens [T]: position t predicts token t+1, so T-1 predictions count.
    """
    ref = torch.log_softmax(ref_logits[:-1].double(), dim=-1)
    q = torch.log_softmax(q_logits[:-1].double(), dim=-1)
    target = tokens[1:].long().view(-1, 1)
    nll_ref = -ref.gather(1, target).mean()
    nll_q = -q.gather(1, target).mean()
    kl = (ref.exp() * (ref - q)).sum(-1).mean()
    agree = (ref.argmax(-1) == q.argmax(-1)).double().mean()
    return Quality(int(target.numel()), math.exp(nll_ref), math.exp(nll_q), float(agree), float(kl))


@torch.inference_mode()
def model_logits(model: nn.Module, tokens: torch.Tensor, window: int) -> torch.Tensor:
    """fp32 logits [T, V] for one token sequence, in independent windows of `window` tokens."""
    device = next(p for p in model.parameters()).device
    chunks = [
        model(tokens[i : i + window].view(1, -1).to(device), 0)[0].float().cpu()
        for i in range(0, tokens.numel(), window)
    ]
    return torch.cat(chunks)


def build_quantized_model(
    reader: Any, device: torch.device, dtype: torch.dtype, max_seq_len: int | None = None
) -> nn.Module:
    """A ready-to-run Transformer from a bitsandbytes HF checkpoint (`reader.quantization` set).

    `dtype` is that of the unquantized tensors (embeddings, norms, head) and of activations.
    """

    from llamactl.model import Transformer

    spec = QuantSpec.from_hf_config(reader.quantization, str(reader.path / "config.json"))
    args = dataclasses.replace(reader.args, max_seq_len=max_seq_len or reader.args.max_seq_len)
    with torch.device("meta"):
        model = Transformer(args)
    load_quantized_state(model, reader.files, spec, device, dtype)
    model.reset_rope(args.max_seq_len)
    return model.eval()


@hookimpl
def register_quantizers(register: Callable[[str, QuantSpec], None]) -> None:
    register("int8", QuantSpec(bits=8))
    register("nf4", QuantSpec(bits=4, quant_type="nf4"))
    register("fp4", QuantSpec(bits=4, quant_type="fp4"))
