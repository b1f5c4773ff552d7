"""Native quantized checkpoints: Hugging Face's layout with q8 / q4 block projections.

config.json (with `quantization_config: {"quant_method": "llamactl", "scheme": "q4",
"group_size": 32, ...}`), tokenizer files and safetensors shards, as an HF checkpoint; each
quantized projection is ONE uint8 entry under its HF name (`model.layers.0.mlp.down_proj
.weight`, shape [out, in / g * block_bytes]) holding GGUF's Q8_0 / Q4_0 blocks byte for byte
(`llamactl.quantize.native_layout` has the contract), rows in HF's rotary order like every
other HF tensor. Unquantized tensors are stored as the hf format stores them.

Why this container and not GGUF itself: it keeps llamactl's HF tooling (shards, index,
tokenizer files, `info`), and a GGUF file is one cheap re-wrap away (`checkpoint/gguf.py`:
the same bytes, rows un-permuted). transformers cannot load it: its torchao integration
expects torchao's tensor subclasses, not GGML blocks, and it ignores an unknown
quant_method; it then refuses every block entry, whose shape [out, in / g * (2 + g or g/2)]
never equals [out, in] (a RuntimeError naming the mismatch), so nothing is mis-loaded.
Through transformers' GGUF support it loads the GGUF export (dequantized to float).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llamactl import layout
from llamactl.checkpoint.base import CheckpointReader
from llamactl.checkpoint.formats import CheckpointFormat
from llamactl.checkpoint.hf import CONFIG_FILE, quantization_method
from llamactl.checkpoint.hf_quantized import QuantizedHFReader, quantized_format
from llamactl.config import ModelArgs
from llamactl.errors import CheckpointError, printable
from llamactl.layout import TensorInfo
from llamactl.plugins import hookimpl
from llamactl.quantize import QuantizedTensor
from llamactl.quantize.native_layout import WEIGHT, logical_shape
from llamactl.quantize.spec import NATIVE_METHOD

if TYPE_CHECKING:
    from llamactl.checkpoint.base import Entry


def detect_native(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and quantization_method(path) == NATIVE_METHOD


@dataclass
class NativeReader(QuantizedHFReader):
    """A native q8 / q4 checkpoint in the canonical layout; quantized projections stay blocks."""

    format: str = "native"
    quantized: dict[str, str] = field(default_factory=dict)  # HF name -> Meta name of each block entry

    def _quantized_infos(self) -> list[TensorInfo]:
        assert self.quant is not None
        infos = []
        for info in self._canonical_infos():
            hf_name = layout.meta_to_hf(info.name)
            if info.dtype != "uint8":
                infos.append(info)
                continue
            where = f"{self.extents[hf_name].file if hf_name in self.extents else self.path}: tensor {printable(hf_name or info.name)}"
            if not layout.is_quantizable(info.name):
                raise CheckpointError(f"{where} is uint8 but not a block projection")
            shape = logical_shape(self.quant, info.shape, where)
            stored = info.nbytes
            self.quantized[str(hf_name)] = info.name
            infos.append(TensorInfo(info.name, shape, "uint8", self.quant.scheme, stored))
        return infos

    def iter_tensors(self) -> Iterator[tuple[str, Entry]]:
        assert self.quant is not None
        shapes = {i.name: i.shape for i in self.infos}
        for hf_name, tensor in self.iter_raw():
            meta = layout.hf_to_meta(hf_name)
            if meta is None:
                continue
            if hf_name in self.quantized:
                heads = layout.rotary_heads(meta, self.args)
                yield meta, QuantizedTensor(self.quant, shapes[meta], {WEIGHT: tensor}, row_heads=heads)
            else:
                yield from self._plain(hf_name, meta, tensor)

    def _plain(self, hf_name: str, meta: str, tensor: object) -> Iterator[tuple[str, Entry]]:
        from llamactl.checkpoint.hf import from_hf_rows

        yield meta, from_hf_rows(meta, tensor, self.args)  # type: ignore[arg-type]
        if meta == "tok_embeddings.weight" and "output.weight" not in {layout.hf_to_meta(n) for n in self.stored}:
            yield "output.weight", tensor  # type: ignore[misc]


@dataclass
class _HFRows:
    """A reader whose quantized entries all arrive in HF's row order (what the hf writer stores)."""

    source: CheckpointReader

    def __getattr__(self, name: str) -> object:
        return getattr(self.source, name)

    def iter_tensors(self) -> Iterator[tuple[str, Entry]]:
        args: ModelArgs = self.source.args
        for name, entry in self.source.iter_tensors():
            heads = layout.rotary_heads(name, args)
            if isinstance(entry, QuantizedTensor) and heads and not entry.row_heads:
                from llamactl.rotary import permute_for_hf

                entry = QuantizedTensor(
                    entry.spec, entry.shape, {WEIGHT: permute_for_hf(entry.parts[WEIGHT], heads)}, heads
                )
            yield name, entry


FORMAT = quantized_format(
    "native",
    "native",
    detect_native,
    NativeReader.open,
    "Hugging Face layout + llamactl q8/q4 (GGUF Q8_0/Q4_0 blocks; llamactl loads it as is)",
    stored_rows=_HFRows,  # type: ignore[arg-type]
)


@hookimpl
def register_formats(register: Callable[[CheckpointFormat], None]) -> None:
    register(FORMAT)
