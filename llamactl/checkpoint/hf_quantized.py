"""What the quantized Hugging Face formats (`bnb`, `native`) share: opening, planning, writing.

Both are HF directories (config.json with a `quantization_config`, safetensors shards, tokenizer
files) whose block projections are stored quantized; they differ only in how a quantized
projection is stored (bitsandbytes' parts, or one uint8 entry of GGUF blocks), which each
format's reader says in `_quantized_infos` / `iter_tensors`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamactl import layout
from llamactl.checkpoint.base import CheckpointReader, output_chat_template
from llamactl.checkpoint.formats import CheckpointFormat, WriteOptions, WritePlan
from llamactl.checkpoint.hf import HFReader, plan_hf, write_hf, write_tokenizer_files
from llamactl.errors import CheckpointError
from llamactl.layout import TensorInfo
from llamactl.quantize import QuantSpec
from llamactl.quantize.spec import SCHEMES


@dataclass
class QuantizedHFReader(HFReader):
    """An HF checkpoint whose `quantization_config` is one llamactl reads; subclasses store blocks."""

    @staticmethod
    def _quantization(config: dict[str, Any], where: Path) -> QuantSpec | None:
        return QuantSpec.from_hf_config(config.get("quantization_config"), str(where))

    def _tensor_infos(self) -> list[TensorInfo]:
        for file in self.files:
            if file.suffix != ".safetensors":
                raise CheckpointError(f"{file}: a quantized checkpoint must be stored as safetensors")
        return self._quantized_infos()

    def _quantized_infos(self) -> list[TensorInfo]:
        raise NotImplementedError


def unquantized_modules(reader: CheckpointReader) -> list[str]:
    """HF module names of the block projections the checkpoint keeps in float (the skip list)."""
    kept = [i.name for i in reader.tensor_infos() if layout.is_quantizable(i.name) and i.scheme is None]
    return [(layout.meta_to_hf(name) or name).removesuffix(".weight") for name in kept]


def quantized_format(
    name: str,
    method: str,
    detect: Callable[[Path], bool],
    open_reader: Callable[[Path], CheckpointReader],
    description: str,
    stored_rows: Callable[[CheckpointReader], CheckpointReader] = lambda reader: reader,
) -> CheckpointFormat:
    """The format of one `QuantSpec.method`; `stored_rows` puts entries in the order it stores."""

    def plan(reader: CheckpointReader, options: WriteOptions) -> WritePlan:
        if reader.quant is None or reader.quant.method != method:
            schemes = ", ".join(scheme for scheme, (_, of) in SCHEMES.items() if of == method)
            raise CheckpointError(f"{reader.path}: a {name} checkpoint needs a {method} scheme ({schemes})")
        return plan_hf(reader.tensor_infos(), options.max_shard_bytes, options.dtype, reader.quant)

    def write(out_dir: Path, reader: CheckpointReader, plan: WritePlan, options: WriteOptions) -> None:
        assert reader.quant is not None
        extra = {"quantization_config": reader.quant.to_hf_config(unquantized_modules(reader))}
        write_hf(out_dir, plan, stored_rows(reader), options.on_tensor, extra)
        if reader.tokenizer_path is not None:
            write_tokenizer_files(out_dir, reader.tokenizer_path, reader.args, output_chat_template(reader))

    return CheckpointFormat(name, detect, open_reader, plan, write, description, schemes=(method,))
