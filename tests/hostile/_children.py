"""Real child processes of the CLI: start a conversion, wait until it is writing, hit it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def start_convert(src: Path, dst: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "llamactl", "convert", str(src), str(dst), "--to", "meta", "--shards", "1", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def staging(dst: Path) -> list[Path]:
    """The staging entries (`.DST.PID.XXXX.partial`) beside dst."""
    return [p for p in dst.parent.glob(f".{dst.name}.*") if p.name.endswith(".partial")]


def wait_until_writing(child: subprocess.Popen[str], dst: Path, timeout: float = 60) -> bool:
    """True once the child's staging directory exists (False: it finished or died first)."""
    deadline = time.monotonic() + timeout
    while not staging(dst) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return child.poll() is None and bool(staging(dst))


def finish(child: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    out, err = child.communicate(timeout=60)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)
