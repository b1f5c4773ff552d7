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
from llamactl.quantize import QuantSpec, backend, fits, quantizable_names, storage

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
    row_split: int = 1  # the source holds 1/row_split of each wq / wk's rows (a tensor-parallel shard)
    to_quantize: set[str] = field(init=False)
    skipped: list[str] = field(init=False)
    unmatched_skip: list[str] = field(init=False)
    unfit: list[str] = field(init=False)  # projections whose shape the scheme cannot store (left as they are)

    def __post_init__(self) -> None:
        if self.source.quant is not None:
            raise CheckpointError(
                f"{self.source.path}: already quantized ({self.source.quant.scheme}); use the unquantized original"
            )
        infos = self.source.tensor_infos()
        chosen, self.skipped, self.unmatched_skip = quantizable_names([i.name for i in infos], self.skip)
        shapes = {i.name: i.shape for i in infos}
        self.unfit = [name for name in chosen if not fits(self.quant, shapes[name])]
        self.to_quantize = set(chosen) - set(self.unfit)
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
                heads = heads // self.row_split if heads else heads  # a shard's rows hold its own heads
                yield name, impl.quantize(tensor, self.quant, heads, self.device)  # type: ignore[arg-type]
            else:
                yield name, tensor


@dataclass
class DequantizedView(ReaderView):
    """`source` with every quantized tensor restored to `dtype` (for formats that hold plain weights only)."""

    source: CheckpointReader
    dtype: str = "fp32"

    @property
    def quant(self) -> QuantSpec | None:
        return None

    def tensor_infos(self) -> list[TensorInfo]:
        return [TensorInfo(i.name, i.shape, self.dtype) if i.scheme else i for i in self.source.tensor_infos()]

    def iter_tensors(self) -> Iterator[tuple[str, Entry]]:
        from llamactl.dtypes import to_torch
        from llamactl.quantize import QuantizedTensor

        target = to_torch(self.dtype)
        for name, entry in self.source.iter_tensors():
            if isinstance(entry, QuantizedTensor):
                yield name, backend(entry.spec).dequantize(entry, target)
            else:
                yield name, entry
