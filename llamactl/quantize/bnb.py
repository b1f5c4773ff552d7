"""The bitsandbytes backend: int8 (LLM.int8) and 4-bit nf4 / fp4 through bitsandbytes' own functions.

A weight becomes exactly the entries transformers' bitsandbytes integration saves (`weight`,
`SCB`, `weight_format` for 8-bit; `weight` plus the packed `quant_state` entries for 4-bit),
and `QuantizedLinear` wraps bitsandbytes' own Linear8bitLt / Linear4bit, so llamactl computes
what transformers computes. Weights are quantized in Hugging Face's row order (wq / wk
permuted first) because that is what those checkpoints hold; in llamactl's Meta-layout model
the output features are gathered back into Meta's order (`out_index`), which is exact.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import nn

from llamactl import dtypes
from llamactl.errors import CheckpointError, MissingDependencyError
from llamactl.layout import Shape
from llamactl.quantize.bnb_layout import QS_KEY
from llamactl.quantize.spec import QuantSpec
from llamactl.quantize.tensor import QuantizedTensor
from llamactl.rotary import hf_to_meta_index, permute_for_hf, unpermute_from_hf

INSTALL_HINT = "pip install 'bitsandbytes>=0.45'"


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
    if spec.scheme == "int8":
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
        return {"weight": cb.cpu(), "SCB": scb.cpu(), "weight_format": torch.tensor(0, dtype=torch.uint8)}
    packed, state = bnb.functional.quantize_4bit(
        w,
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type=spec.scheme,
        quant_storage=torch.uint8,
    )
    parts = {"weight": packed.cpu()}
    for key, value in state.as_dict(packed=True).items():
        parts[f"weight.{key}"] = value.detach().cpu()
    return parts


def parts_scheme(parts: Mapping[str, Any]) -> str | None:
    """'int8', 'nf4', 'fp4' from the entries present (names or tensors), None for a plain weight."""
    if "SCB" in parts:
        return "int8"
    for key in parts:
        if key.startswith(QS_KEY):
            return key.removeprefix(QS_KEY)
    return None


def quant_state_from_parts(parts: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> Any:
    """bitsandbytes' QuantState from saved 4-bit entries (what Params4bit.from_prequantized does)."""
    bnb = require_bitsandbytes()
    stats = {k.removeprefix("weight."): v for k, v in parts.items() if k != "weight"}
    return bnb.functional.QuantState.from_dict(qs_dict=stats, device=torch.device(device))


def dequantize_parts(parts: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [out, in] weight the saved entries stand for (stored row order), via bitsandbytes."""
    bnb = require_bitsandbytes()
    scheme = parts_scheme(parts)
    if scheme == "int8":
        return bnb.functional.int8_vectorwise_dequant(parts["weight"], parts["SCB"]).to(dtype)
    if scheme in ("nf4", "fp4"):
        state = quant_state_from_parts(parts, parts["weight"].device)
        return bnb.functional.dequantize_4bit(parts["weight"], state).to(dtype)
    return parts["weight"].to(dtype)


# ----------------------------------------------------------------------------- the model


class QuantizedLinear(nn.Module):
    """A bitsandbytes Linear8bitLt / Linear4bit; `out_index` gathers HF-ordered rows into Meta's order."""

    def __init__(self, inner: nn.Module, scheme: str, out_index: torch.Tensor | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.scheme = scheme
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.register_buffer("out_index", out_index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)  # [..., out] in the stored (HF) row order
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


def _inner_module(parts: Mapping[str, torch.Tensor], spec: QuantSpec, shape: Shape, device: torch.device) -> nn.Module:
    """bitsandbytes' own module from saved entries, as transformers' Bnb8bit/4bitDeserialize do."""
    bnb = require_bitsandbytes()
    out_features, in_features = int(shape[0]), int(shape[1])
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
                compute_dtype=dtypes.to_torch(spec.compute_dtype),
                compress_statistics=spec.double_quant,
                quant_type=spec.scheme,
            )
    if scheme == "int8":
        inner.weight = bnb.nn.Int8Params(
            parts["weight"], requires_grad=False, has_fp16_weights=False, SCB=parts["SCB"]
        ).to(device)
    elif scheme in ("nf4", "fp4"):
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
    return inner


class BitsAndBytes:
    """The Backend protocol (llamactl.quantize.tensor) for bitsandbytes' schemes."""

    def prepare(self, device: torch.device) -> None:
        require_bitsandbytes(device)

    def quantize(
        self, weight: torch.Tensor, spec: QuantSpec, heads: int | None, device: torch.device
    ) -> QuantizedTensor:
        stored = permute_for_hf(weight, heads) if heads else weight
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        return QuantizedTensor(spec, shape, quantize_tensor(stored, spec, device), row_heads=heads)

    def dequantize(self, tensor: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        w = dequantize_parts(tensor.parts, dtype)
        return unpermute_from_hf(w, tensor.row_heads) if tensor.row_heads else w

    def linear(self, tensor: QuantizedTensor, device: torch.device) -> nn.Module:
        inner = _inner_module(tensor.parts, tensor.spec, tensor.shape, device)
        index = hf_to_meta_index(tensor.shape[0], tensor.row_heads).to(device) if tensor.row_heads else None
        return QuantizedLinear(inner, tensor.spec.scheme, index).eval()  # inference only: bnb's training paths differ

    def joined_linear(self, tensors: Sequence[QuantizedTensor], device: torch.device) -> nn.Module | None:
        return None  # bitsandbytes' modules hold one weight each (and transformers' layout)


BACKEND = BitsAndBytes()
