"""One tensor-parallel rank's share of a checkpoint: `RankView(reader, rank, world)`.

A Meta checkpoint with exactly `world` model-parallel shards is already cut the way tensor
parallelism needs (`llamactl.layout`'s split dims are Meta's): rank R reads only the tensor
bytes of its own `consolidated.RR.pth` and merges nothing. Every other source (another MP
count, Hugging Face, GGUF, plugin formats) is split on the fly: each full tensor is read,
its rank's slice copied out and the full tensor dropped before the next one, so a rank never
holds more than its share plus one tensor. Tensors a checkpoint stores quantized cannot be
sliced yet (their packed blocks and statistics would have to be cut too): quantize on load.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamactl.checkpoint.base import CheckpointReader, ReaderView
from llamactl.checkpoint.sharding import shard_shape, split_tensor
from llamactl.checkpoint.tensor_io import Files
from llamactl.errors import CheckpointError
from llamactl.layout import TensorInfo, split_dim

if TYPE_CHECKING:
    from llamactl.checkpoint.base import Entry
    from llamactl.quantize import QuantSpec


@dataclass
class RankView(ReaderView):
    """`source` as rank `rank` of `world` sees it: every split tensor cut to its 1/world share."""

    source: CheckpointReader
    rank: int
    world: int

    def __post_init__(self) -> None:
        if self.source.quant is not None:
            raise CheckpointError(
                f"{self.source.path}: stored quantized ({self.source.quant.scheme}); tensor parallelism needs "
                "the unquantized checkpoint (quantize on load with --bits / --scheme instead)"
            )

    @property
    def quant(self) -> QuantSpec | None:
        return None

    @property
    def own_shard(self) -> bool:
        """True when this rank reads its own Meta shard file and nothing else."""
        return self.source.format == "meta" and len(self.source.files) == self.world and hasattr(self.source, "records")

    def tensor_infos(self) -> list[TensorInfo]:
        return [
            TensorInfo(i.name, shard_shape(i.name, i.shape, self.world), i.dtype) for i in self.source.tensor_infos()
        ]

    def iter_tensors(self) -> Iterator[tuple[str, Entry]]:
        if self.own_shard:
            records = self.source.records[self.rank]  # type: ignore[attr-defined]
            with Files() as files:
                for info in self.source.tensor_infos():
                    yield info.name, files.read(records[info.name].extent, info.name)
            return
        import torch

        for name, entry in self.source.iter_tensors():
            if not isinstance(entry, torch.Tensor):
                raise CheckpointError(f"{self.source.path}: tensor {name} is stored quantized; it cannot be split")
            if split_dim(name) is None:
                yield name, entry
            else:  # a copy of the slice, so the full tensor is freed now
                yield name, split_tensor(name, entry, self.world)[self.rank].clone()
