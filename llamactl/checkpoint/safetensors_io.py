"""Streaming safetensors writing.

safetensors' own `save_file` needs every tensor of a file in memory at once. When the
tensors' names, shapes and dtypes are known up front, the header can be written first and
each tensor's bytes dropped into place as it arrives, so memory stays near one tensor.
The files are read back by the safetensors library itself in the tests.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from llamactl.checkpoint.sharding import TensorInfo

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_header(
    infos: Sequence[TensorInfo], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, int]]:
    """The length-prefixed header for tensors laid out in order, and each tensor's data offset."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offsets, position = {}, 0
    for info in infos:
        header[info.name] = {
            "dtype": SAFETENSORS_DTYPES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [position, position + info.nbytes],
        }
        offsets[info.name] = position
        position += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte alignment, as the safetensors library pads
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {name: start + off for name, off in offsets.items()}


class SafetensorsFileWriter:
    """One .safetensors file whose tensors may arrive in any order."""

    def __init__(self, path: Path, infos: Sequence[TensorInfo], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.infos = {i.name: i for i in infos}
        header, self.offsets = safetensors_header(infos, metadata)
        total = len(header) + sum(i.nbytes for i in infos)
        self.handle = open(path, "wb")  # noqa: SIM115 (closed by close(), called in a finally)
        self.handle.write(header)
        self.handle.truncate(total)
        self.pending = set(self.infos)

    def write(self, name: str, data: memoryview) -> None:
        info = self.infos[name]
        if len(data) != info.nbytes:
            raise AssertionError(f"{name}: {len(data)} bytes, planned {info.nbytes}")
        self.handle.seek(self.offsets[name])
        self.handle.write(data)
        self.pending.discard(name)

    def close(self) -> None:
        self.handle.close()
