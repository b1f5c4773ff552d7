"""Fixtures the hostile suite shares: a source big enough to interrupt, scratch file systems."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._ckpt import random_meta_state, tiny_args, write_meta_checkpoint


@pytest.fixture(scope="session")
def big_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Big enough (~20 MB, MP=2) that a conversion is still writing when a signal or a rival lands."""
    args = tiny_args(dim=384, n_layers=16, n_heads=8, n_kv_heads=2, vocab_size=4000, multiple_of=128)
    return write_meta_checkpoint(tmp_path_factory.mktemp("big") / "src", args, random_meta_state(args), mp=2)


@contextlib.contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[Path]:
    """A small real tmpfs mounted at path (root only); skips, saying why, where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; run as root to test full and read-only disks")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(autouse=True)
def _nothing_written_outside(tmp_path: Path) -> Iterator[None]:
    """A hostile test may write only under its own tmp_path: not beside it, not in the cwd."""
    watched = [Path.cwd(), tmp_path.parent]
    before = {d: set(os.listdir(d)) for d in watched}
    yield
    for d in watched:
        new = set(os.listdir(d)) - before[d] - {tmp_path.name}
        assert not new, f"written outside the test's temp root, in {d}: {sorted(new)}"
