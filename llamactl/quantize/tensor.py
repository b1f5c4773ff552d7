"""A weight held quantized, as readers yield it and writers and the model consume it.

Checkpoints stream canonical entries: a plain tensor, or a `QuantizedTensor` standing for one
[out, in] block projection. The scheme's backend (`llamactl.quantize.backend`) knows its
parts; everything else sees a logical shape, a byte count and a scheme name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from llamactl.layout import Shape, TensorInfo
from llamactl.quantize.spec import QuantSpec

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class QuantizedTensor:
    """The stored parts of one quantized weight.

    `parts` are the backend's entries, named relative to the module (bitsandbytes: exactly
    what transformers saves, e.g. `weight`, `SCB`, `weight.absmax`...). `row_heads` is set
    when the rows are stored in Hugging Face's rotary order, permuted by that many heads
    (bitsandbytes checkpoints quantize wq / wk after the HF permutation, and 4-bit blocks run
    over the flattened rows, so the bytes depend on that order).
    """

    spec: QuantSpec
    shape: Shape  # logical [out, in], Meta's row order
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    row_heads: int | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    @property
    def storage_dtype(self) -> str:
        from llamactl.dtypes import name_of

        return name_of(self.parts["weight"].dtype)

    def info(self, name: str) -> TensorInfo:
        return TensorInfo(name, self.shape, self.storage_dtype, scheme=self.spec.scheme, stored_bytes=self.nbytes)


class Backend(Protocol):
    """How one quantization method stores, restores and runs a weight."""

    def prepare(self, device: torch.device) -> None:
        """Import the kernels and check they run on `device` (one clear error otherwise)."""
        ...

    def quantize(
        self, weight: torch.Tensor, spec: QuantSpec, heads: int | None, device: torch.device
    ) -> QuantizedTensor:
        """weight [out, in] in Meta's row order; `heads` for wq / wk (their rotary permutation)."""
        ...

    def dequantize(self, tensor: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        """The [out, in] weight in Meta's row order."""
        ...

    def linear(self, tensor: QuantizedTensor, device: torch.device) -> nn.Module:
        """A module computing x @ W.T for the quantized W, x [..., in] -> [..., out]."""
        ...

    def joined_linear(self, tensors: Sequence[QuantizedTensor], device: torch.device) -> nn.Module | None:
        """One module computing x @ [W1; W2; ...].T for weights of the same input (wq|wk|wv,
        w1|w3): one kernel call instead of several. None where the method cannot join them."""
        ...


class Layout(Protocol):
    """How one quantization method stores a weight, known from its shape alone (no torch)."""

    def stored_bytes(self, spec: QuantSpec, shape: Shape) -> int:
        """Bytes one [out, in] weight takes stored, statistics included."""
        ...

    def part_infos(self, spec: QuantSpec, prefix: str, shape: Shape) -> list[TensorInfo]:
        """The entries a writer will receive for one weight, named `prefix.<part>`."""
        ...

    def supports(self, spec: QuantSpec, shape: Shape) -> bool:
        """Whether a weight of this [out, in] shape can be stored (else it stays unquantized)."""
        ...
