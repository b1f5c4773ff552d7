"""Real signals on real child processes: SIGINT and SIGTERM mid-write leave nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._ckpt import random_meta_state, tiny_args, write_meta_checkpoint
from tests.hostile._contract import snapshot

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def big_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Big enough (~20 MB, MP=2) that a conversion is still writing when the signal lands."""
    args = tiny_args(dim=384, n_layers=16, n_heads=8, n_kv_heads=2, vocab_size=4000, multiple_of=128)
    return write_meta_checkpoint(tmp_path_factory.mktemp("big") / "src", args, random_meta_state(args), mp=2)


def _convert_then_signal(src: Path, dst: Path, sig: int) -> subprocess.CompletedProcess[str]:
    child = subprocess.Popen(
        [sys.executable, "-m", "llamactl", "convert", str(src), str(dst), "--to", "meta", "--shards", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(dst.parent.glob(f".{dst.name}.*")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # until writing has started
    child.send_signal(sig)
    out, err = child.communicate(timeout=60)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_signal_mid_write(big_src: Path, tmp_path: Path, sig: int, code: int, word: str) -> None:
    before = snapshot(big_src)
    done = _convert_then_signal(big_src, tmp_path / "out", sig)
    if done.returncode == 0:
        pytest.skip("the conversion finished before the signal arrived")
    assert done.returncode == code, done.stderr
    assert done.stderr.strip().splitlines() == [f"llamactl: {word}"] and done.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no DST, no .partial
    assert snapshot(big_src) == before
