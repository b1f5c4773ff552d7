"""Real signals on real child processes: SIGINT and SIGTERM mid-write leave nothing behind;
after a SIGKILL, which no process survives to clean up, the next run removes the leftovers."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.hostile._children import finish, staging, start_convert, wait_until_writing
from tests.hostile._contract import snapshot

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_signal_mid_write(big_src: Path, tmp_path: Path, sig: int, code: int, word: str) -> None:
    before = snapshot(big_src)
    child = start_convert(big_src, tmp_path / "out")
    wait_until_writing(child, tmp_path / "out")
    child.send_signal(sig)
    done = finish(child)
    if done.returncode == 0:
        pytest.skip("the conversion finished before the signal arrived")
    assert done.returncode == code, done.stderr
    assert done.stderr.strip().splitlines() == [f"llamactl: {word}"] and done.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no DST, no .partial
    assert snapshot(big_src) == before


@pytest.mark.slow
def test_sigkill_leftovers_are_removed_by_the_next_run(big_src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    child = start_convert(big_src, dst)
    if not wait_until_writing(child, dst):
        pytest.skip("the conversion finished before it could be killed")
    child.kill()
    assert finish(child).returncode == -signal.SIGKILL
    left = staging(dst)
    assert len(left) == 1 and not dst.exists()  # SIGKILL: nothing could clean up

    rerun = finish(start_convert(big_src, dst))
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr.strip().splitlines() == [
        f"llamactl: warning: {left[0]}: removed the staging directory of an interrupted run (pid {child.pid})"
    ]
    assert staging(dst) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
