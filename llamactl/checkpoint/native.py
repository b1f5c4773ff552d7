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
from llamactl.checkpoint.base import CheckpointReader, check_against_args, output_chat_template
from llamactl.checkpoint.formats import CheckpointFormat, WriteOptions, WritePlan
from llamactl.checkpoint.hf import (
    CONFIG_FILE,
    HFReader,
    plan_hf,
    quantization_method,
    write_hf,
    write_tokenizer_files,
)
from llamactl.config import ModelArgs, args_from_hf_config, read_json
from llamactl.errors import CheckpointError, printable
from llamactl.layout import TensorInfo
from llamactl.plugins import hookimpl
from llamactl.quantize import QuantizedTensor, QuantSpec
from llamactl.quantize.native_layout import WEIGHT, logical_shape
from llamactl.quantize.spec import NATIVE_METHOD

if TYPE_CHECKING:
    from llamactl.checkpoint.base import Entry


def detect_native(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and quantization_method(path) == NATIVE_METHOD


@dataclass
class NativeReader(HFReader):
    """A native q8 / q4 checkpoint in the canonical layout; quantized projections stay blocks."""

    format: str = "native"
    quantized: dict[str, str] = field(default_factory=dict)  # HF name -> Meta name of each block entry

    @classmethod
    def open(cls, path: Path) -> NativeReader:
        config_path = path / CONFIG_FILE
        config = read_json(config_path)
        args = args_from_hf_config(config, config_path)
        reader = cls(path=path, args=args, files=[], config=config)
        reader.context_known = "max_position_embeddings" in config
        reader.quant = QuantSpec.from_hf_config(config.get("quantization_config"), str(config_path))
        reader._index_files()
        for file in reader.files:
            if file.suffix != ".safetensors":
                raise CheckpointError(f"{file}: a quantized checkpoint must be stored as safetensors")
        reader.infos = reader._quantized_infos()
        check_against_args(reader.infos, args, str(path), CONFIG_FILE)
        return reader

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


def unquantized_modules(reader: CheckpointReader) -> list[str] | None:
    """`modules_to_not_convert`: HF modules of block projections left unquantized (None: none)."""
    kept = [i.name for i in reader.tensor_infos() if layout.is_quantizable(i.name) and i.scheme is None]
    return [(layout.meta_to_hf(n) or n).removesuffix(".weight") for n in kept] or None


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


def plan_format(reader: CheckpointReader, options: WriteOptions) -> WritePlan:
    if reader.quant is None or reader.quant.method != "native":
        raise CheckpointError(f"{reader.path}: a native checkpoint needs a native scheme (q8, q4)")
    return plan_hf(reader.tensor_infos(), options.max_shard_bytes, options.dtype, reader.quant)


def write_format(out_dir: Path, reader: CheckpointReader, plan: WritePlan, options: WriteOptions) -> None:
    assert reader.quant is not None
    extra = {"quantization_config": reader.quant.to_hf_config(unquantized_modules(reader))}
    write_hf(out_dir, plan, _HFRows(reader), options.on_tensor, extra)  # type: ignore[arg-type]
    if reader.tokenizer_path is not None:
        write_tokenizer_files(out_dir, reader.tokenizer_path, reader.args, output_chat_template(reader))


FORMAT = CheckpointFormat(
    "native",
    detect_native,
    NativeReader.open,
    plan_format,
    write_format,
    "Hugging Face layout + llamactl q8/q4 (GGUF Q8_0/Q4_0 blocks; llamactl loads it as is)",
    schemes=("native",),
)


@hookimpl
def register_formats(register: Callable[[CheckpointFormat], None]) -> None:
    register(FORMAT)
