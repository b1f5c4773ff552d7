"""The destination under attack: a DST that appears or is swapped mid-run, two runs racing for
one DST, a read-only or full file system. Nothing that was not checked at the start is replaced."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from llamactl.atomic import remove_stale
from llamactl.convert import plan_convert, run_convert
from llamactl.errors import DestinationError
from tests._ckpt import random_meta_state, tiny_args, write_meta_checkpoint
from tests.cli._run import run_cli
from tests.hostile._children import finish, staging, start_convert, wait_until_writing
from tests.hostile._contract import TIME_LIMIT_S, assert_refused, snapshot
from tests.hostile.conftest import tmpfs

pytestmark = pytest.mark.timeout(TIME_LIMIT_S)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    args = tiny_args()
    return write_meta_checkpoint(tmp_path / "src", args, random_meta_state(args))


def _someone_elses(dst: Path) -> None:
    dst.mkdir()
    (dst / "theirs.txt").write_text("precious")


def _convert_with(src: Path, dst: Path, during: object, force: bool = False) -> None:
    """Run a conversion that calls `during()` once, after the first tensor is written."""
    plan = plan_convert(src, dst, "hf", force=force)
    calls = []

    def on_tensor(_name: str, _nbytes: int) -> None:
        if not calls:
            calls.append(1)
            during()  # type: ignore[operator]

    run_convert(plan, on_tensor=on_tensor)


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_dst_that_appears_mid_run_is_left_alone(src: Path, tmp_path: Path, force: bool) -> None:
    dst = tmp_path / "out"
    with pytest.raises(DestinationError, match="appeared while writing"):
        _convert_with(src, dst, lambda: _someone_elses(dst), force=force)
    assert (dst / "theirs.txt").read_text() == "precious" and sorted(p.name for p in dst.iterdir()) == ["theirs.txt"]
    assert staging(dst) == []


def test_force_replaces_only_the_dst_it_checked(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("checked at start")

    def swap() -> None:
        dst.rename(tmp_path / "moved-away")
        _someone_elses(dst)

    with pytest.raises(DestinationError, match="was replaced by another one while writing"):
        _convert_with(src, dst, swap, force=True)
    assert sorted(p.name for p in dst.iterdir()) == ["theirs.txt"]
    assert (tmp_path / "moved-away" / "old.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved-away", "out", "src"]


def test_force_replaces_the_checked_dst(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("checked at start")
    _convert_with(src, dst, lambda: None, force=True)
    assert (dst / "config.json").is_file() and not (dst / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_gguf_file_that_appears_mid_run_is_left_alone(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out.gguf"
    plan = plan_convert(src, dst, "gguf")
    seen = []

    def on_tensor(_name: str, _nbytes: int) -> None:
        if not seen:
            seen.append(dst.write_bytes(b"theirs"))

    with pytest.raises(DestinationError, match="appeared while writing"):
        run_convert(plan, on_tensor=on_tensor)
    assert dst.read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "src"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_concurrent_converts_exactly_one_wins(big_src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    before = snapshot(big_src)
    first = start_convert(big_src, dst)
    wait_until_writing(first, dst)
    second = start_convert(big_src, dst)
    results = [finish(first), finish(second)]
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 1], [(r.returncode, r.stderr) for r in results]
    loser = next(r for r in results if r.returncode == 1)
    lines = loser.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llamactl: error: {dst}: "), loser.stderr
    assert "appeared while writing" in lines[0] or "already exists" in lines[0]
    assert (dst / "params.json").is_file() and staging(dst) == []
    assert snapshot(big_src) == before


def test_stale_staging_is_judged_by_pid_and_lock(tmp_path: Path) -> None:
    import fcntl
    import subprocess

    dst = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        gone = tmp_path / f".out.{dead.pid}.aaaa.partial"
        live = tmp_path / f".out.{alive.pid}.bbbb.partial"
        locked = tmp_path / f".out.{dead.pid}.cccc.partial"
        fifo = tmp_path / f".out.{dead.pid}.dddd.partial"
        for path in (gone, live, locked):
            path.mkdir()
            (path / "x").write_bytes(b"half")
        os.mkfifo(fifo)
        (tmp_path / ".other.1.eeee.partial").mkdir()  # another DST's: not ours to judge
        fd = os.open(locked, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer in another pid namespace would hold this
        heard: list[str] = []
        try:
            assert remove_stale(dst, heard.append) == [gone]
        finally:
            os.close(fd)
        assert heard == [f"{gone}: removed the staging directory of an interrupted run (pid {dead.pid})"]
        assert live.is_dir() and locked.is_dir() and fifo.exists() and (tmp_path / ".other.1.eeee.partial").is_dir()
    finally:
        alive.kill()
        alive.wait()


def test_read_only_destination(src: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro", "size=1m") as ro:
        before = snapshot(tmp_path / "src")
        for args in (
            ("convert", str(src), str(ro / "out"), "--to", "hf"),
            ("convert", str(src), str(ro / "o.gguf"), "--to", "gguf"),
        ):
            outcome = run_cli(*args)
            assert_refused(
                outcome, f"{ro}: cannot write here (Read-only file system)", root=tmp_path / "src", before=before
            )
        assert os.listdir(ro) == []


def test_full_disk(src: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=64k") as small:
        before = snapshot(tmp_path / "src")
        for args in (
            ("convert", str(src), str(small / "out"), "--to", "hf"),
            ("convert", str(src), str(small / "o.gguf"), "--to", "gguf"),
        ):
            outcome = run_cli(*args)
            assert_refused(
                outcome,
                "no space left on device while writing; nothing was written",
                root=tmp_path / "src",
                before=before,
            )
        assert os.listdir(small) == []


def test_unwritable_parent_without_root(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no tmpfs can be mounted: the same refusal for an injected EACCES at the first write."""
    import tempfile

    def denied(*_a: object, **_k: object) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    outcome = run_cli("convert", str(src), str(tmp_path / "out"), "--to", "hf")
    assert_refused(outcome, f"{tmp_path}: cannot write here (Permission denied)")
    assert not (tmp_path / "out").exists()
    shutil.rmtree(tmp_path / "src")
