"""The torch-free .pth index: equal to what torch.load sees, and strict about records and globals."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from llamactl.checkpoint.pth import load_tensors, read_index
from llamactl.errors import CheckpointError


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save(state, path)
    return path


def test_index_equals_torch_load(tmp_path: Path) -> None:
    state = {
        "a": torch.randn(3, 5),
        "b": torch.zeros(7, dtype=torch.bfloat16),
        "c": torch.ones(2, 2, dtype=torch.float16),
        "view": torch.arange(12.0)[2:8].view(2, 3),  # a tensor that starts inside its storage
    }
    file = _save(tmp_path / "x.pth", state)
    index = read_index(file)
    loaded = load_tensors(file)
    assert list(index) == list(state)
    for name, tensor in loaded.items():
        assert index[name].shape == tuple(tensor.shape)
        assert index[name].dtype == {"a": "fp32", "b": "bf16", "c": "fp16", "view": "fp32"}[name]
        assert torch.equal(tensor, state[name])


def test_reading_the_index_never_imports_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    file = _save(tmp_path / "x.pth", {"w": torch.randn(4, 4)})
    code = (
        "import sys; from llamactl.checkpoint.pth import read_index; "
        f"info = read_index(__import__('pathlib').Path({str(file)!r}))['w']; "
        "print(info.shape, info.dtype, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["(4,", "4)", "fp32", "False"]


def test_record_shorter_than_its_tensor_is_refused(tmp_path: Path) -> None:
    """A forged record (the pickle claims 64 floats, the record holds 16) would map garbage."""
    file = _save(tmp_path / "x.pth", {"w": torch.randn(8, 8)})
    forged = tmp_path / "forged.pth"
    with zipfile.ZipFile(file) as src, zipfile.ZipFile(forged, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:64] if info.filename.endswith("/data/0") else data)
    with pytest.raises(CheckpointError, match=r"forged\.pth: tensor w: its data record holds 64 bytes"):
        read_index(forged)


def test_global_other_than_tensors_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (__import__("os").system, (f"touch {marker}",))

    file = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2)}, file)
    with zipfile.ZipFile(file) as src:
        entries = [(i, src.read(i)) for i in src.infolist()]
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as dst:
        for info, data in entries:
            dst.writestr(info, pickle.dumps({"w": Evil()}, protocol=2) if info.filename.endswith("data.pkl") else data)
    with pytest.raises(CheckpointError, match=r"references posix\.system"):
        read_index(file)
    assert not marker.exists()


def test_compressed_record_is_refused(tmp_path: Path) -> None:
    file = _save(tmp_path / "x.pth", {"w": torch.zeros(256)})
    packed = tmp_path / "packed.pth"
    with zipfile.ZipFile(file) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(CheckpointError, match="compressed"):
        read_index(packed)


def test_not_a_zip_is_one_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"bad\.pth: unreadable or truncated PyTorch checkpoint"):
        read_index(bad)
