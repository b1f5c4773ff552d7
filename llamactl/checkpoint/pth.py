"""PyTorch `.pth` checkpoints: metadata read without torch, records checked, tensors memory-mapped.

`torch.save` writes a zip: `<name>/data.pkl` (a pickle of the state dict whose tensors refer to
storages by key) and one stored record `<name>/data/<key>` per storage. `read_index` runs
that pickle through an unpickler that builds nothing but descriptions (any global other than
the tensor-rebuild function, storage classes and OrderedDict is refused), so `info` and
`list` never import torch, and every tensor is checked against the record that holds its
bytes before anything maps it: a forged record shorter than its tensor would otherwise be
read as garbage weights (or past the end of the file). `load_tensors` then loads the data
with `torch.load(mmap=True, weights_only=True)`.
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
from llamactl.errors import CheckpointError, printable
from llamactl.layout import TensorInfo

if TYPE_CHECKING:
    import torch

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
        _check_record(file, name, stub, records.get(f"{prefix}data/{stub.storage.key}"))
        out[name] = TensorInfo(name, stub.shape, stub.storage.dtype)
    return out


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
    """Memory-map a checkpoint whose index was checked; only tensors are ever unpickled."""
    import torch

    try:
        obj = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        first = printable(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise CheckpointError(f"{file}: unreadable or truncated PyTorch checkpoint ({first})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors")
    return {k: v for k, v in obj.items() if k not in ignored}
