"""The GGUF container read without torch or numpy, every byte range checked before it is used.

A GGUF file (llama.cpp's gguf-py/gguf/constants.py, docs/gguf.md) is: magic `GGUF`, version
(2 or 3), tensor count and KV count (uint64), the KV pairs (string key, uint32 value type,
value), the tensor infos (name, n_dims, dims innermost first, uint32 ggml type, uint64 offset
relative to the data section), padding to `general.alignment` (default 32), then the data.

Why not `gguf.GGUFReader`: it materialises every element of every array as a numpy object
(3.9 s to open the 135M-parameter SmolLM2 file, whose vocabulary and merges are ~100k
strings), walks array lengths the header claims without checking them against the file (a
lying length loops for a very long time) and reports a truncated or forged file as numpy
reshape/index errors. Here arrays are skipped by offset and decoded only on request, and
every problem is one `CheckpointError` naming the file. The gguf package still writes our
files, quantizes for the writer and checks everything in the tests.
"""

from __future__ import annotations

import itertools
import math
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamactl.checkpoint.gguf_quants import BY_ID, GGMLType, type_name
from llamactl.errors import CheckpointError, printable

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF value types: id -> (struct format, size) for scalars; 8 is STRING, 9 ARRAY.
STRING, ARRAY = 8, 9
SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}


@dataclass(frozen=True)
class GGUFArray:
    """An array value, kept as where it lies; `GGUFFile.array` decodes it."""

    item_type: int
    count: int
    offset: int  # of the first element
    end: int


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor info, validated against the file: `dims` in GGUF order (innermost first)."""

    name: str
    ggml: GGMLType
    dims: tuple[int, ...]
    start: int  # absolute byte offset of its data
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """torch order: [rows, cols] for a weight (GGUF's dims reversed)."""
        return tuple(reversed(self.dims))

    @property
    def numel(self) -> int:
        return math.prod(self.dims)


@dataclass
class GGUFFile:
    """Header of one GGUF file: scalar KVs as Python values, arrays by location, tensor infos."""

    path: Path
    version: int
    size: int
    fields: dict[str, Any] = field(default_factory=dict)  # key -> int | float | bool | str | GGUFArray
    types: dict[str, int] = field(default_factory=dict)  # key -> GGUF value type
    tensors: list[GGUFTensor] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT
    data_start: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def array(self, key: str) -> list[Any] | None:
        """An array KV decoded (strings as str), or None when absent or not an array."""
        value = self.fields.get(key)
        if not isinstance(value, GGUFArray):
            return None
        return list(_decode_array(_mapped(self.path), value, self.path, key))


def _mapped(path: Path) -> memoryview:
    """The whole file, memory-mapped read-only.

    Not closed explicitly: slices of it may still be referenced (by a traceback, say), and
    closing an mmap with live exports raises; the mapping goes when the last view does.
    """
    try:
        with open(path, "rb") as f:
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None


class _Cursor:
    """Reads little-endian values from the header; running past the end is a CheckpointError."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def fail(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: invalid GGUF file ({why})")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"truncated: the file ends inside {what}, at byte {self.pos} of {len(self.buf)}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, size: int, what: str) -> Any:
        return struct.unpack(fmt, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", 8, what))

    def string(self, what: str) -> str:
        length = self.u64(what)
        raw = self.take(length, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def room(self, count: int, item_bytes: int, what: str) -> None:
        """Refuse a count the rest of the file cannot hold, before looping over it."""
        if count * item_bytes > len(self.buf) - self.pos:
            raise self.fail(f"{what} claims {count} entries, more than the {len(self.buf) - self.pos} bytes left")


def _quote(name: str) -> str:
    return repr(printable(name)[:120])


def read_gguf(path: Path) -> GGUFFile:
    """Parse and validate the header of `path` (nothing of the tensor data is read)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size < 24:
        raise CheckpointError(f"{path}: invalid GGUF file (truncated: {size} bytes, shorter than the header)")
    return _parse(_mapped(path), path, size)


def _parse(buf: memoryview, path: Path, size: int) -> GGUFFile:
    cur = _Cursor(buf, path)
    magic = bytes(cur.take(4, "the magic"))
    if magic != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (magic {printable(repr(magic))}, expected b'GGUF')")
    version = cur.u32("the version")
    if version not in VERSIONS and version & 0xFFFF == 0:
        raise CheckpointError(f"{path}: big-endian GGUF files are not supported")
    if version not in VERSIONS:
        raise CheckpointError(f"{path}: unsupported GGUF version {version} (llamactl reads versions 2 and 3)")
    n_tensors, n_kv = cur.u64("the tensor count"), cur.u64("the KV count")
    out = GGUFFile(path=path, version=version, size=size)
    cur.room(n_kv, 13, "the KV section")  # key length 8 + type 4 + at least 1 byte of value
    for _ in range(n_kv):
        _read_kv(cur, out)
    cur.room(n_tensors, 32, "the tensor section")  # name length, n_dims, one dim, type, offset
    infos = [_read_tensor_info(cur) for _ in range(n_tensors)]
    out.alignment = _alignment(cur, out)
    out.data_start = cur.pos + (-cur.pos % out.alignment)
    out.tensors = _place_tensors(cur, infos, out)
    return out


def _read_kv(cur: _Cursor, out: GGUFFile) -> None:
    key = cur.string("a KV key")
    if key in out.fields:
        raise cur.fail(f"duplicate KV key {_quote(key)}")
    kind = cur.u32(f"the type of KV {_quote(key)}")
    out.fields[key] = _read_value(cur, kind, f"KV {_quote(key)}")
    out.types[key] = kind


def _read_value(cur: _Cursor, kind: int, what: str) -> Any:
    if kind in SCALARS:
        return cur.scalar(*SCALARS[kind], what)
    if kind == STRING:
        return cur.string(what)
    if kind != ARRAY:
        raise cur.fail(f"{what} has unknown value type {kind}")
    item_type, count = cur.u32(what), cur.u64(what)
    start = cur.pos
    if item_type in SCALARS:
        cur.room(count, SCALARS[item_type][1], what)
        cur.pos += count * SCALARS[item_type][1]
    elif item_type == STRING:
        cur.room(count, 8, what)
        for _ in range(count):
            cur.take(cur.u64(what), what)
    else:
        raise cur.fail(f"{what} is an array of value type {item_type}, which llamactl does not read")
    return GGUFArray(item_type, count, start, cur.pos)


def _decode_array(buf: memoryview, array: GGUFArray, path: Path, key: str) -> Iterator[Any]:
    cur = _Cursor(buf, path)
    cur.pos = array.offset
    if array.item_type == STRING:
        for _ in range(array.count):
            yield cur.string(f"KV {_quote(key)}")
        return
    fmt, width = SCALARS[array.item_type]
    yield from (v for (v,) in struct.iter_unpack(fmt, buf[array.offset : array.offset + array.count * width]))


def _read_tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string("a tensor name")
    what = f"tensor {_quote(name)}"
    n_dims = cur.u32(what)
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"{what} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    dims = tuple(cur.u64(what) for _ in range(n_dims))
    return name, dims, cur.u32(what), cur.u64(what)


def _alignment(cur: _Cursor, out: GGUFFile) -> int:
    value = out.fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if out.types.get("general.alignment", 4) != 4 or not 0 < value <= 1 << 20 or value & (value - 1):
        raise cur.fail(f"general.alignment {printable(str(value))[:40]} is not a power of two (uint32)")
    return int(value)


def _place_tensors(cur: _Cursor, infos: list[tuple[str, tuple[int, ...], int, int]], out: GGUFFile) -> list[GGUFTensor]:
    """Check every tensor's type, size and byte range: inside the file, aligned, no overlaps."""
    tensors, seen = [], set()
    for name, dims, type_id, offset in infos:
        what = f"tensor {_quote(name)}"
        if name in seen:
            raise cur.fail(f"duplicate {what}")
        seen.add(name)
        ggml = BY_ID.get(type_id)
        if ggml is None:
            supported = ", ".join(t.name for t in BY_ID.values())
            raise cur.fail(
                f"{what} has ggml type {type_name(type_id)}, which llamactl cannot read (it reads {supported})"
            )
        if any(d <= 0 for d in dims) or dims[0] % ggml.block:
            raise cur.fail(f"{what} has shape {list(reversed(dims))}, not whole {ggml.name} blocks of {ggml.block}")
        nbytes = ggml.nbytes(math.prod(dims))
        start = out.data_start + offset
        if offset % out.alignment:
            raise cur.fail(f"{what} starts at offset {offset}, not a multiple of the alignment {out.alignment}")
        if start + nbytes > out.size:
            raise cur.fail(
                f"{what} ({ggml.name} {list(reversed(dims))}) needs bytes {start}..{start + nbytes} "
                f"but the file has {out.size}: truncated, or its offsets lie"
            )
        tensors.append(GGUFTensor(name, ggml, dims, start, nbytes))
    ordered = sorted(tensors, key=lambda t: t.start)
    for before, after in itertools.pairwise(ordered):
        if after.start < before.start + before.nbytes:
            raise cur.fail(f"tensor {_quote(after.name)} overlaps tensor {_quote(before.name)}")
    return tensors
