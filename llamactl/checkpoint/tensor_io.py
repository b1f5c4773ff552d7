"""Reading one tensor's bytes from a checkpoint file: plain reads into a fresh tensor, never a map.

Readers know where every tensor lies (a safetensors header, a .pth index, a GGUF tensor
table), validated when the checkpoint was opened. Copying those bytes with read() rather
than memory-mapping the file means a file truncated or rewritten while llamactl reads it is
a short read we report, naming the file, instead of a SIGBUS that kills the process; and
each tensor arrives in one large sequential read, straight into its final buffer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from llamactl import dtypes
from llamactl.errors import CheckpointError, printable

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Extent:
    """Where one tensor's bytes are. `stride`/`storage_offset` (elements) view a larger storage."""

    file: Path
    offset: int  # absolute byte offset of the storage in the file
    nbytes: int  # bytes of the storage to read
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None = None  # None: contiguous, the whole extent
    storage_offset: int = 0


class Files:
    """Open handles for the files of one pass over a checkpoint (each opened once)."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, IO[bytes]] = {}

    def __enter__(self) -> Files:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def handle(self, file: Path) -> IO[bytes]:
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(open(file, "rb", buffering=0))  # noqa: SIM115
            except OSError as exc:
                raise CheckpointError(f"{file}: cannot read ({exc.strerror or exc})") from None
        return self._handles[file]

    def read(self, extent: Extent, name: str) -> torch.Tensor:
        """The tensor at `extent`, in its own memory (a short read is an error naming the file)."""
        import torch

        buffer = torch.empty(extent.nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy()) if extent.nbytes else memoryview(b"")
        handle = self.handle(extent.file)
        got = 0
        try:
            handle.seek(extent.offset)
            while got < extent.nbytes:
                n = handle.readinto(view[got:])
                if not n:
                    break
                got += n
        except OSError as exc:
            raise CheckpointError(
                f"{extent.file}: cannot read tensor {printable(name)} ({exc.strerror or exc})"
            ) from None
        if got < extent.nbytes:
            raise CheckpointError(
                f"{extent.file}: ended after {got} of the {extent.nbytes} bytes of tensor {printable(name)} "
                "(truncated or changed while llamactl read it)"
            )
        tensor = buffer.view(dtypes.to_torch(extent.dtype))
        if extent.stride is None:
            return tensor.view(extent.shape)
        return tensor.as_strided(extent.shape, extent.stride, extent.storage_offset).contiguous()
