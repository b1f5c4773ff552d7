"""Moving one tensor's bytes between checkpoint files: plain reads and writes, never a map.

Readers know where every tensor lies (a safetensors header, a .pth index, a GGUF tensor
table), validated when the checkpoint was opened. Copying those bytes with read() rather
than memory-mapping the file means a file truncated or rewritten while llamactl reads it is
a short read we report, naming the file, instead of a SIGBUS that kills the process; and
each tensor arrives in one large sequential read, straight into its final buffer.

Fresh memory is expensive: the kernel zeroes and maps every page on first touch, which on
this kind of (virtualised) host costs as much as reading the bytes twice. A conversion
therefore reads into `Scratch` buffers it reuses from tensor to tensor, and `write_tensor`
sends a tensor to a file straight from its memory, or (strided, or cast on the way) through a
small reused chunk, so no tensor is copied whole just to be written.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
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

    def read(self, extent: Extent, name: str, scratch: Scratch | None = None, slot: int = 0) -> torch.Tensor:
        """The tensor at `extent` (a short read is an error naming the file).

        In its own memory, or with `scratch` in that buffer's `slot`: valid until the slot is reused.
        """
        import torch

        if scratch is not None:
            buffer = scratch.take(slot, extent.nbytes)
        else:
            buffer = torch.empty(extent.nbytes, dtype=torch.uint8)
        self.read_into(extent, name, buffer)
        tensor = buffer.view(dtypes.to_torch(extent.dtype))
        if extent.stride is None:
            return tensor.view(extent.shape)
        return tensor.as_strided(extent.shape, extent.stride, extent.storage_offset).contiguous()

    def read_into(self, extent: Extent, name: str, out: torch.Tensor) -> None:
        """Read the extent's bytes into `out` (contiguous, exactly extent.nbytes long)."""
        import torch

        assert out.is_contiguous() and out.numel() * out.element_size() == extent.nbytes, name
        flat = out.view(-1).view(torch.uint8)
        view = memoryview(flat.numpy()) if extent.nbytes else memoryview(b"")
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


class Scratch:
    """Byte buffers reused from tensor to tensor, one per slot, each grown to the largest asked for.

    What `take` returns is valid until the same slot is taken again; memory stays bounded by
    the largest tensor per slot.
    """

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def take(self, slot: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of `nbytes` in slot `slot` (its old contents are garbage)."""
        import torch

        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < nbytes:
            self._buffers.pop(slot, None)  # free the smaller one before allocating
            buffer = self._buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return buffer[:nbytes]

    def like(self, slot: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of `shape` and `dtype` in slot `slot`."""
        nbytes = math.prod(shape) * dtype.itemsize
        return self.take(slot, nbytes).view(dtype).view(tuple(shape))


CHUNK_BYTES = 16 << 20  # one write's worth when a tensor must be copied on its way out


def write_tensor(handle: IO[bytes], tensor: torch.Tensor, dtype: torch.dtype, scratch: Scratch, slot: int = 0) -> int:
    """Write `tensor` as `dtype`, in C order, at the handle's position; returns the bytes written.

    A contiguous tensor already in `dtype` goes out in one write from its own memory; any other
    (a strided view, a rotary permutation, a cast) is copied in chunks of leading-dim slices
    through `scratch`, so the whole tensor is never duplicated.
    """
    if tensor.numel() == 0:
        return 0
    if tensor.dtype == dtype and tensor.is_contiguous():
        return _write_all(handle, tensor)
    row_bytes = math.prod(tensor.shape[1:]) * dtype.itemsize if tensor.dim() > 1 else dtype.itemsize
    if tensor.dim() == 0:
        tensor = tensor.reshape(1)
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    written = 0
    for start in range(0, tensor.shape[0], step):
        part = tensor[start : start + step]
        chunk = scratch.like(slot, part.shape, dtype)
        chunk.copy_(part)  # gathers strided rows and casts in one pass
        written += _write_all(handle, chunk)
    return written


def _write_all(handle: IO[bytes], tensor: torch.Tensor) -> int:
    import torch

    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):  # a raw file may write less than asked
        done += handle.write(view[done:]) or 0
    return done
