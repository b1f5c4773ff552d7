"""Atomic outputs: a directory or a single file appears complete or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamactl.atomic import atomic_file, check_destination, file_id
from llamactl.errors import DestinationError


def test_atomic_file_replaces_only_on_success(tmp_path: Path) -> None:
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(dst, file_id(dst)) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert dst.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]
    with atomic_file(dst, file_id(dst)) as tmp:
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


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "claim-fallback"])
def test_rename_noreplace_never_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renameat2: bool) -> None:
    from llamactl import atomic

    if not renameat2:
        monkeypatch.setattr(atomic, "_libc_renameat2", None)  # as on a kernel or libc without it
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("a")
    (tmp_path / "taken").mkdir()  # even an empty directory, which plain rename(2) would replace
    (tmp_path / "file").write_text("mine")
    (tmp_path / "other").write_text("theirs")
    for src, dst in (("a", "taken"), ("file", "other"), ("file", "taken")):
        with pytest.raises(FileExistsError):
            atomic.rename_noreplace(tmp_path / src, tmp_path / dst)
    atomic.rename_noreplace(tmp_path / "a", tmp_path / "b")
    atomic.rename_noreplace(tmp_path / "file", tmp_path / "file2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "file2", "other", "taken"]
    assert (tmp_path / "b" / "f").read_text() == "a" and (tmp_path / "other").read_text() == "theirs"
