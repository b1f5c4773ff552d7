"""A reader that quantizes a checkpoint's block projections as they stream.

`QuantizedView(reader, spec)` is itself a CheckpointReader: its infos mark the tensors it
will quantize (with their stored size), and `iter_tensors` yields them as `QuantizedTensor`s.
Writing it is `quantize` (convert with a scheme); loading it is quantize-on-load. Weights are
quantized from the checkpoint's own precision, one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llamactl import layout
from llamactl.checkpoint.base import CheckpointReader, ReaderView
from llamactl.devices import resolve_device
from llamactl.errors import CheckpointError
from llamactl.layout import TensorInfo
from llamactl.quantize import QuantSpec, backend, quantizable_names, storage

if TYPE_CHECKING:
    import torch

    from llamactl.checkpoint.base import Entry


@dataclass
class QuantizedView(ReaderView):
    """`source` with its block projections (minus those matching `skip`) quantized by `quant`."""

    source: CheckpointReader
    quant: QuantSpec
    skip: Sequence[str] = ()
    device: torch.device | str | None = None
    to_quantize: set[str] = field(init=False)
    skipped: list[str] = field(init=False)
    unmatched_skip: list[str] = field(init=False)

    def __post_init__(self) -> None:
        if self.source.quant is not None:
            raise CheckpointError(
                f"{self.source.path}: already quantized ({self.source.quant.scheme}); use the unquantized original"
            )
        chosen, self.skipped, self.unmatched_skip = quantizable_names(
            [i.name for i in self.source.tensor_infos()], self.skip
        )
        self.to_quantize = set(chosen)
        self.device, _ = resolve_device(self.device)  # the GPU when there is one: quantizing is faster there
        backend(self.quant).prepare(self.device)

    def tensor_infos(self) -> list[TensorInfo]:
        layout_ = storage(self.quant)
        out = []
        for info in self.source.tensor_infos():
            if info.name in self.to_quantize:
                size = layout_.stored_bytes(self.quant, info.shape)
                info = TensorInfo(info.name, info.shape, "uint8", scheme=self.quant.scheme, stored_bytes=size)
            out.append(info)
        return out

    def iter_tensors(self) -> Iterator[tuple[str, Entry]]:
        impl = backend(self.quant)
        for name, tensor in self.source.iter_tensors():
            if name in self.to_quantize:
                heads = layout.rotary_heads(name, self.args)
                yield name, impl.quantize(tensor, self.quant, heads, self.device)  # type: ignore[arg-type]
            else:
                yield name, tensor
