"""safetensors headers read without torch, and the one streaming safetensors writer.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every
tensor's dtype, shape and byte range, then the packed bytes. Reading the header ourselves
keeps metadata paths (`info`, `list`) free of torch and lets us refuse what the spec forbids
(duplicate names, a header that is not a JSON object, byte ranges with holes or overlaps,
sizes that contradict dtype x shape) with one line naming the file.

Writing: safetensors' own `save_file` needs a whole file's tensors in memory at once. The
writer here reserves room for the header, appends each tensor's bytes as it arrives (so
memory stays near one tensor, and quantized tensors whose exact sizes are only known after
quantizing fit the same path), then writes the header into the reserved room, padded with
spaces as the format allows.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from llamactl import dtypes, jsonio
from llamactl.checkpoint.tensor_io import Scratch, write_tensor
from llamactl.errors import CheckpointError, printable
from llamactl.layout import TensorInfo

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
_ST_TO_NAME = {d.safetensors: d.name for d in dtypes.DTYPE_TABLE}


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: dtype (llamactl short name), shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.name, self.shape, self.dtype)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise CheckpointError(f"duplicate tensor name {printable(key)[:200]!r} in the header")
        seen[key] = value
    return seen


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """(entries in file order, __metadata__) of a safetensors file, validated against its size."""
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: invalid safetensors file (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: invalid safetensors file (header length {length} exceeds the file)")
            raw = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("the header is not a JSON object")
        header = jsonio.loads(text, object_pairs_hook=_no_duplicates)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: invalid safetensors file ({exc})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid safetensors file ({printable(str(exc))})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    entries = {name: _entry(path, name, spec, data_start) for name, spec in header.items()}
    _check_coverage(path, entries, size - data_start, data_start)
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _entry(path: Path, name: str, spec: Any, data_start: int) -> Entry:
    where = f"{path}: invalid safetensors file (tensor {printable(name)[:200]}"
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: header entry is not an object)")
    dtype = _ST_TO_NAME.get(spec.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise CheckpointError(f"{where} has unsupported dtype {printable(str(spec.get('dtype')))[:40]})")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise CheckpointError(f"{where}: shape {printable(str(shape))[:80]} is not a list of sizes)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {printable(str(offsets))[:80]} are not two integers)")
    begin, end = offsets
    if not 0 <= begin <= end or end - begin != math.prod(shape) * dtypes.itemsize(dtype):
        raise CheckpointError(f"{where}: data_offsets {offsets} do not hold {dtype} {shape})")
    return Entry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_coverage(path: Path, entries: dict[str, Entry], data_bytes: int, data_start: int) -> None:
    """The byte ranges must tile the data exactly: no hole, no overlap, nothing past the end."""
    position = data_start
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start != position:
            what = "overlaps the previous tensor" if entry.start < position else "leaves a hole before it"
            raise CheckpointError(f"{path}: invalid safetensors file (tensor {printable(entry.name)[:200]} {what})")
        position = entry.end
    if position != data_start + data_bytes:
        why = "truncated" if position > data_start + data_bytes else "has bytes no tensor claims"
        covered = position - data_start
        raise CheckpointError(
            f"{path}: invalid safetensors file ({why}: header covers {covered} bytes, file has {data_bytes})"
        )


def read_bytes(path: Path, entry: Entry) -> bytes:
    """The raw bytes of one (small) tensor, e.g. a quantization state stored as uint8 JSON."""
    with open(path, "rb") as f:
        f.seek(entry.start)
        return f.read(entry.end - entry.start)


# ----------------------------------------------------------------------------- writing


def header_bytes(entries: Sequence[tuple[str, str, Sequence[int], int, int]], metadata: dict[str, str]) -> bytes:
    """The JSON header for (name, dtype, shape, begin, end) entries (offsets relative to the data)."""
    header: dict[str, object] = {"__metadata__": metadata}
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtypes.lookup(dtype).safetensors, "shape": list(shape), "data_offsets": [begin, end]}
    return json.dumps(header, separators=(",", ":")).encode()


class SafetensorsWriter:
    """One .safetensors file written in a single pass, tensors appended in arrival order.

    `planned` names every tensor the file will hold (shapes may be estimates for entries whose
    size is only known after quantizing); room for the header is reserved from it, with slack.
    """

    def __init__(self, path: Path, planned: Sequence[TensorInfo], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.metadata = metadata or {"format": "pt"}
        self.pending = {info.name for info in planned}
        placeholder = [(i.name, i.dtype, i.shape, 10**15, 10**15) for i in planned]
        budget = len(header_bytes(placeholder, self.metadata)) + 32 * len(planned) + 256
        self.budget = budget + (-budget % 8)  # keeps the data 8-byte aligned, as safetensors does
        self.entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
        self.position = 0
        self.handle: IO[bytes] = open(path, "wb")  # noqa: SIM115 (closed by close(), called in a finally)
        self.handle.write(b"\0" * (8 + self.budget))

    def add(self, name: str, dtype: str, shape: Sequence[int], data: memoryview | bytes) -> None:
        """Append one tensor's raw little-endian bytes."""
        expected = self._expect(name, dtype, shape)
        if len(data) != expected:
            raise AssertionError(f"{name}: {len(data)} bytes for {dtype} {list(shape)} ({expected} expected)")
        self.handle.write(data)
        self._record(name, dtype, shape, len(data))

    def add_tensor(self, name: str, dtype: str, shape: Sequence[int], tensor: torch.Tensor, scratch: Scratch) -> int:
        """Append a tensor of any layout, cast to `dtype` on the way (in C order, as `shape`)."""
        expected = self._expect(name, dtype, shape)
        if tensor.numel() != math.prod(shape):
            raise AssertionError(f"{name}: {tensor.numel()} elements for {list(shape)}")
        written = write_tensor(self.handle, tensor, dtypes.to_torch(dtype), scratch)
        assert written == expected, (name, written, expected)
        self._record(name, dtype, shape, written)
        return written

    def _expect(self, name: str, dtype: str, shape: Sequence[int]) -> int:
        if name not in self.pending:
            raise AssertionError(f"{self.path.name}: tensor {name} was not planned for this file (or came twice)")
        return math.prod(shape) * dtypes.itemsize(dtype)

    def _record(self, name: str, dtype: str, shape: Sequence[int], nbytes: int) -> None:
        self.entries.append((name, dtypes.name_of(dtype), tuple(shape), self.position, self.position + nbytes))
        self.position += nbytes
        self.pending.discard(name)

    @property
    def nbytes(self) -> int:
        """Tensor bytes written so far (what an index's total_size counts)."""
        return self.position

    def finish(self) -> None:
        """Write the header into its reserved room; every planned tensor must have arrived."""
        if self.pending:
            raise CheckpointError(f"source ended before tensor {sorted(self.pending)[0]} was written")
        raw = header_bytes(self.entries, self.metadata)
        if len(raw) > self.budget:
            raise AssertionError(f"{self.path.name}: header of {len(raw)} bytes exceeds its reserved {self.budget}")
        self.handle.seek(0)
        self.handle.write(struct.pack("<Q", self.budget) + raw + b" " * (self.budget - len(raw)))
        self.handle.close()

    def close(self) -> None:
        self.handle.close()
