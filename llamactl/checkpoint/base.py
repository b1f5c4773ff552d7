"""The reader protocol every checkpoint format implements, and shared validation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from llamactl.checkpoint.sharding import TensorInfo, expected_shapes
from llamactl.config import ModelArgs
from llamactl.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.model"


class CheckpointReader(Protocol):
    """A checkpoint seen in the canonical layout: Meta names, Meta q/k layout, merged shards."""

    format: str
    path: Path
    args: ModelArgs
    files: list[Path]
    tokenizer_path: Path | None
    quantization: dict[str, Any] | None

    def tensor_infos(self) -> list[TensorInfo]:
        """Every tensor's canonical name, full shape and dtype, without reading data."""
        ...

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (meta_name, tensor) one at a time; never holds the whole model."""
        ...


@dataclass
class ReaderBase:
    """Fields shared by the built-in readers."""

    path: Path
    args: ModelArgs
    files: list[Path]
    infos: list[TensorInfo] = field(default_factory=list)
    quantization: dict[str, Any] | None = None

    @property
    def tokenizer_path(self) -> Path | None:
        candidate = self.path / TOKENIZER_FILE
        return candidate if candidate.is_file() else None

    def tensor_infos(self) -> list[TensorInfo]:
        return list(self.infos)

    @property
    def nbytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def check_against_args(infos: Sequence[TensorInfo], args: ModelArgs, where: str, config_name: str) -> None:
    """Every expected tensor present with the shape the config implies; nothing unknown."""
    expected = expected_shapes(args)
    seen = {info.name: info for info in infos}
    for name, shape in expected.items():
        if name not in seen:
            raise CheckpointError(f"{where}: tensor {name} is missing (expected by {config_name})")
        if seen[name].shape != shape:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {list(seen[name].shape)} but {config_name} implies {list(shape)}"
            )
    extra = sorted(set(seen) - set(expected))
    if extra:
        raise CheckpointError(
            f"{where}: unexpected tensor {extra[0]} for a {args.n_layers}-layer Llama ({len(extra)} unexpected)"
        )
    for info in infos:
        if not info.dtype.is_floating_point:
            raise CheckpointError(f"{where}: tensor {info.name} has dtype {info.dtype}, expected a float type")


def order_like(infos: Sequence[TensorInfo], args: ModelArgs) -> list[TensorInfo]:
    """Infos in the canonical Meta order (embeddings, layers, norm, output)."""
    order = {name: i for i, name in enumerate(expected_shapes(args))}
    return sorted(infos, key=lambda info: order.get(info.name, len(order)))
