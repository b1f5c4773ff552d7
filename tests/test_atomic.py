"""Atomic outputs: a directory or a single file appears complete or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.atomic import atomic_file, check_destination
from llamactl.errors import DestinationError


def test_atomic_file_replaces_only_on_success(tmp_path: Path) -> None:
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(dst) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert dst.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]
    with atomic_file(dst) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.gguf.")
        tmp.write_bytes(b"new")
    assert dst.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_file_destination_rules(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "dir.gguf").mkdir()
    (tmp_path / "f.gguf").write_bytes(b"x")
    check_destination(src, tmp_path / "new.gguf", force=False, file=True)
    check_destination(src, tmp_path / "f.gguf", force=True, file=True)
    with pytest.raises(DestinationError, match="already exists"):
        check_destination(src, tmp_path / "f.gguf", force=False, file=True)
    with pytest.raises(DestinationError, match="is a directory"):
        check_destination(src, tmp_path / "dir.gguf", force=True, file=True)
    with pytest.raises(DestinationError, match="inside the source"):
        check_destination(src, src / "x.gguf", force=False, file=True)
