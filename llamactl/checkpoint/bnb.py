"""bitsandbytes checkpoints: Hugging Face's layout with int8 / nf4 / fp4 block projections.

What transformers' bitsandbytes integration saves: config.json with a `quantization_config`,
and per quantized module its parts (`weight`, `SCB`, `weight_format` for int8; `weight` plus
`weight.absmax`, `weight.quant_map`, nested statistics and the JSON
`weight.quant_state.bitsandbytes__<type>` for 4-bit). Read, each such module becomes one
`QuantizedTensor` under its Meta name with its logical shape (4-bit records it in the JSON);
written, the HF writer stores the parts again. So `info`, `list`, `load_model` and `convert`
see these checkpoints through the same reader protocol as any other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llamactl import layout
from llamactl.checkpoint.formats import CheckpointFormat
from llamactl.checkpoint.hf import CONFIG_FILE, quantization_method
from llamactl.checkpoint.hf_quantized import QuantizedHFReader, quantized_format
from llamactl.checkpoint.safetensors_io import read_bytes, read_header
from llamactl.checkpoint.tensor_io import Extent, Files
from llamactl.errors import CheckpointError, printable
from llamactl.layout import TensorInfo
from llamactl.plugins import hookimpl
from llamactl.quantize import QuantizedTensor
from llamactl.quantize.bnb_layout import QS_KEY, state_shape

if TYPE_CHECKING:
    from llamactl.checkpoint.base import Entry


def detect_bnb(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and quantization_method(path) == "bitsandbytes"


def module_parts(names: list[str]) -> dict[str, list[str]]:
    """HF module -> its stored part names, for every quantized module among `names`."""
    modules = {n.removesuffix(".SCB") for n in names if n.endswith(".SCB")}
    modules |= {n.split(".weight.quant_state.")[0] for n in names if f".{QS_KEY}" in n}
    groups: dict[str, list[str]] = {m: [] for m in modules}
    for n in names:
        for m in (n.rsplit(".", 1)[0], n.split(".weight.")[0], n.removesuffix(".weight")):
            if m in groups and n.startswith(m + "."):
                groups[m].append(n)
                break
    return groups


@dataclass
class BnbReader(QuantizedHFReader):
    """A bitsandbytes HF checkpoint in the canonical layout; quantized modules stay quantized."""

    format: str = "bnb"
    modules: dict[str, list[str]] = field(default_factory=dict)  # HF module -> stored part names
    parts: dict[str, TensorInfo] = field(default_factory=dict)  # every stored entry, quantized parts too
    part_extents: dict[str, Extent] = field(default_factory=dict)

    def _quantized_infos(self) -> list[TensorInfo]:
        self.parts, self.part_extents = dict(self.stored), dict(self.extents)
        self.modules = module_parts(list(self.parts))
        grouped = {name for parts in self.modules.values() for name in parts}
        plain = {name: info for name, info in self.stored.items() if name not in grouped}
        self.stored = plain  # HFReader's canonical infos see the unquantized tensors only
        infos = self._canonical_infos()
        assert self.quant is not None
        for module, parts in self.modules.items():
            meta = layout.hf_to_meta(module + ".weight")
            file = self.extents[parts[0]].file
            if meta is None or not layout.is_quantizable(meta):
                raise CheckpointError(f"{file}: quantized tensor {printable(module)}.weight is not a block projection")
            shape = self._logical_shape(module, parts, file)
            stored = sum(self.parts[p].nbytes for p in parts)
            infos.append(TensorInfo(meta, shape, self.parts[f"{module}.weight"].dtype, self.quant.scheme, stored))
        return infos

    def _logical_shape(self, module: str, parts: list[str], file: Path) -> tuple[int, ...]:
        """int8 keeps the [out, in] shape; 4-bit records it in its quant_state JSON."""
        if f"{module}.weight" not in parts:
            raise CheckpointError(f"{file}: quantized module {printable(module)} has no weight")
        states = [p for p in parts if QS_KEY in p]
        if not states:
            return self.parts[f"{module}.weight"].shape
        entry = read_header(file)[0][states[0]]
        return state_shape(read_bytes(file, entry), f"{file}: {printable(states[0])}")

    def iter_tensors(self) -> Iterator[tuple[str, Entry]]:
        assert self.quant is not None
        shapes = {layout.meta_to_hf(i.name): i.shape for i in self.infos if i.scheme is not None}
        yield from super().iter_tensors()  # the unquantized tensors (embeddings, norms, head, skipped)
        with Files() as files:
            for module, parts in self.modules.items():
                meta = layout.hf_to_meta(module + ".weight")
                assert meta is not None
                entries = {p[len(module) + 1 :]: files.read(self.part_extents[p], p) for p in parts}
                heads = layout.rotary_heads(meta, self.args)
                yield meta, QuantizedTensor(self.quant, shapes[module + ".weight"], entries, row_heads=heads)


FORMAT = quantized_format(
    "bnb",
    "bitsandbytes",
    detect_bnb,
    BnbReader.open,
    "Hugging Face + bitsandbytes int8/nf4/fp4 (transformers loads it)",
)


@hookimpl
def register_formats(register: Callable[[CheckpointFormat], None]) -> None:
    register(FORMAT)
