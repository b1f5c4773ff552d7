"""Our safetensors header reader and writer against the safetensors library itself."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamactl.checkpoint.base import tensor_bytes
from llamactl.checkpoint.safetensors_io import SafetensorsWriter, read_header
from llamactl.errors import CheckpointError
from llamactl.layout import TensorInfo


def _raw(header: dict[str, object], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def test_header_equals_the_librarys_view(tmp_path: Path) -> None:
    state = {"a": torch.randn(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16), "c": torch.ones((), dtype=torch.uint8)}
    save_file(state, tmp_path / "x.safetensors")
    entries, metadata = read_header(tmp_path / "x.safetensors")
    assert metadata == {}  # save_file without metadata writes none
    assert {n: (e.dtype, e.shape) for n, e in entries.items()} == {
        "a": ("fp32", (3, 4)),
        "b": ("bf16", (5,)),
        "c": ("uint8", ()),
    }
    raw = (tmp_path / "x.safetensors").read_bytes()
    for name, entry in entries.items():
        assert raw[entry.start : entry.end] == bytes(tensor_bytes(state[name]))


def test_writer_output_is_read_by_the_library_in_any_arrival_order(tmp_path: Path) -> None:
    state = {"w": torch.randn(6, 2), "x": torch.arange(10, dtype=torch.int32), "y": torch.randn(3).half()}
    planned = [TensorInfo(n, tuple(t.shape), t.dtype) for n, t in state.items()]
    writer = SafetensorsWriter(tmp_path / "o.safetensors", planned)
    for name in ("y", "w", "x"):
        writer.add(name, str(state[name].dtype), tuple(state[name].shape), tensor_bytes(state[name]))
    writer.finish()
    loaded = load_file(tmp_path / "o.safetensors")
    assert set(loaded) == set(state) and all(torch.equal(loaded[n], state[n]) for n in state)
    assert writer.nbytes == sum(t.numel() * t.element_size() for t in state.values())


def test_writer_refuses_an_unplanned_or_missing_tensor(tmp_path: Path) -> None:
    writer = SafetensorsWriter(tmp_path / "o.safetensors", [TensorInfo("a", (2,), "fp32")])
    with pytest.raises(AssertionError, match="not planned"):
        writer.add("b", "fp32", (2,), b"\0" * 8)
    with pytest.raises(CheckpointError, match="source ended before tensor a"):
        writer.finish()
    writer.close()


@pytest.mark.parametrize(
    ("header", "data", "why"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "bytes no tensor claims"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "leaves a hole"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\0" * 8,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "do not hold fp32 [3]"),
        ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype Q9"),
    ],
)
def test_lying_headers_are_refused(tmp_path: Path, header: dict[str, object], data: bytes, why: str) -> None:
    file = tmp_path / "bad.safetensors"
    file.write_bytes(_raw(header, data))
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: invalid safetensors file") as info:
        read_header(file)
    assert why in str(info.value)


def test_duplicate_names_and_non_object_headers_are_refused(tmp_path: Path) -> None:
    file = tmp_path / "dup.safetensors"
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    text = f'{{"a": {entry}, "a": {entry}}}'.encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
    with pytest.raises(CheckpointError, match="duplicate tensor name 'a'"):
        read_header(file)
    text = b'  ["not", "an", "object"]'
    file.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(CheckpointError, match="not a JSON object"):
        read_header(file)


def test_control_characters_in_names_are_escaped(tmp_path: Path) -> None:
    file = tmp_path / "esc.safetensors"
    file.write_bytes(_raw({"\x1b]0;pwned\x07": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8))
    with pytest.raises(CheckpointError) as info:
        read_header(file)
    assert "\x1b" not in str(info.value) and "\\x1b]0;pwned\\x07" in str(info.value)
