"""PyTorch `.pth` checkpoints: an index read without torch, every record checked, tensors read by extent.

`torch.save` writes a zip: `<name>/data.pkl` (a pickle of the state dict whose tensors refer to
storages by key) and one stored record `<name>/data/<key>` per storage. `read_records` runs
that pickle through an unpickler that builds nothing but descriptions: like
`torch.load(weights_only=True)` it resolves only an allow-list of globals (here just the
tensor-rebuild function, the storage classes and OrderedDict; anything else is refused
before it is called), and it constructs no tensor, so `info` and `list` never import torch.
Every tensor is checked against the record that holds its bytes: a forged record shorter
than its tensor would otherwise be read as garbage weights, or past the end of the file.
The data itself is then read from those validated extents (`tensor_io`); no pickle is
loaded a second time.
"""

from __future__ import annotations

import collections
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamactl import dtypes
from llamactl.checkpoint.tensor_io import Extent, Files
from llamactl.errors import CheckpointError, printable
from llamactl.layout import TensorInfo

if TYPE_CHECKING:
    import torch

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip local file header, 30 bytes


@dataclass(frozen=True)
class Record:
    """One tensor of a .pth: what it is and where its bytes are."""

    info: TensorInfo
    extent: Extent


# torch's legacy storage class names -> llamactl dtype names.
_STORAGES = {
    "FloatStorage": "fp32",
    "HalfStorage": "fp16",
    "BFloat16Storage": "bf16",
    "DoubleStorage": "fp64",
    "CharStorage": "int8",
    "ShortStorage": "int16",
    "IntStorage": "int32",
    "LongStorage": "int64",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _TensorStub:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> _TensorStub:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    return _TensorStub(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


class _Refused(pickle.UnpicklingError):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class _IndexUnpickler(pickle.Unpickler):
    """Describes the tensors of a state-dict pickle; executes nothing."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":  # nn.Parameter(data, ...)
            return lambda data, *_rest: data
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _STORAGES:
            return name
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}"[:100])
        _, storage_type, key, _location, numel = pid
        if storage_type not in _STORAGES:
            raise pickle.UnpicklingError(f"unexpected storage {storage_type!r}"[:100])
        return _Storage(str(key), _STORAGES[storage_type], int(numel))


def read_index(file: Path, ignored: frozenset[str] = frozenset()) -> dict[str, TensorInfo]:
    """name -> TensorInfo of every tensor in a torch zip checkpoint, each checked against its record."""
    return {name: record.info for name, record in read_records(file, ignored).items()}


def read_records(file: Path, ignored: frozenset[str] = frozenset()) -> dict[str, Record]:
    """name -> Record of every tensor in a torch zip checkpoint, each checked against its record."""
    try:
        with zipfile.ZipFile(file) as archive:
            records = {info.filename: info for info in archive.infolist()}
            pickles = [name for name in records if name.endswith("/data.pkl") or name == "data.pkl"]
            if len(pickles) != 1:
                raise CheckpointError(f"{file}: not a PyTorch checkpoint (no single data.pkl inside the zip)")
            prefix = pickles[0].removesuffix("data.pkl")
            byteorder = records.get(prefix + "byteorder")
            if byteorder is not None and archive.read(byteorder).strip() not in (b"", b"little"):
                raise CheckpointError(f"{file}: big-endian checkpoints are not supported")
            state = _IndexUnpickler(archive.open(pickles[0])).load()
            data_starts = _data_starts(file, [i for n, i in records.items() if n.startswith(prefix + "data/")])
    except _Refused as exc:
        raise CheckpointError(
            f"{file}: refused to load: the pickle holds more than tensors (it references {printable(exc.what)})"
        ) from None
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{file}: unreadable or truncated PyTorch checkpoint ({exc})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, struct.error, RecursionError) as exc:
        why = printable(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise CheckpointError(f"{file}: unreadable or truncated PyTorch checkpoint ({why})") from None
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{file}: expected a dict of tensors")
    out = {}
    for name, stub in state.items():
        if name in ignored:
            continue
        if not isinstance(stub, _TensorStub):
            raise CheckpointError(f"{file}: {printable(name)} is not a tensor")
        record = records.get(f"{prefix}data/{stub.storage.key}")
        _check_record(file, name, stub, record)
        assert record is not None
        storage = stub.storage
        contiguous = stub.offset == 0 and stub.stride == _contiguous_strides(stub.shape)
        extent = Extent(
            file,
            data_starts[record.filename],
            record.file_size if not contiguous else math.prod(stub.shape) * dtypes.itemsize(storage.dtype),
            storage.dtype,
            stub.shape,
            None if contiguous else stub.stride,
            0 if contiguous else stub.offset,
        )
        out[name] = Record(TensorInfo(name, stub.shape, storage.dtype), extent)
    return out


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _data_starts(file: Path, records: list[zipfile.ZipInfo]) -> dict[str, int]:
    """Absolute offset of each stored record's bytes (after its local header, which may differ
    in length from the central directory's copy)."""
    starts = {}
    with open(file, "rb") as raw:
        for info in records:
            raw.seek(info.header_offset)
            header = raw.read(_LOCAL_HEADER.size)
            if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{file}: record {printable(info.filename)} has no valid local header")
            fields = _LOCAL_HEADER.unpack(header)
            name_len, extra_len = fields[-2], fields[-1]
            starts[info.filename] = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    return starts


def _check_record(file: Path, name: str, stub: _TensorStub, record: zipfile.ZipInfo | None) -> None:
    """The record must exist, be stored uncompressed (it is memory-mapped) and hold the tensor."""
    where = f"{file}: tensor {printable(name)}"
    storage = stub.storage
    if record is None:
        raise CheckpointError(f"{where}: its data record {storage.key!r} is missing")
    if record.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{where}: its data record is compressed; re-save the checkpoint with torch.save")
    itemsize = dtypes.itemsize(storage.dtype)
    if record.file_size != storage.numel * itemsize:
        raise CheckpointError(
            f"{where}: its data record holds {record.file_size} bytes but the pickle claims "
            f"{storage.numel} × {itemsize} (forged or truncated)"
        )
    if any(s < 0 for s in stub.shape + stub.stride) or stub.offset < 0:
        raise CheckpointError(f"{where}: negative size, stride or offset")
    extent = stub.offset + sum((n - 1) * s for n, s in zip(stub.shape, stub.stride)) + 1
    if math.prod(stub.shape) and extent > storage.numel:
        raise CheckpointError(f"{where}: shape {list(stub.shape)} reaches past its storage of {storage.numel}")


def load_tensors(file: Path, ignored: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read from its checked records (the whole file at once)."""
    records = read_records(file, ignored)
    with Files() as files:
        return {name: files.read(record.extent, name) for name, record in records.items()}
