"""Drive the real CLI in-process and check the contract for bad input."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str, input: str | bytes | None = None) -> Outcome:
    from llamactl.cli import build_app

    result = CliRunner().invoke(build_app(), list(args), input=input, catch_exceptions=False)
    return Outcome(result.exit_code, result.stdout, result.stderr)


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under path, to prove an input was left untouched."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def assert_one_line_error(outcome: Outcome, *fragments: str, code: int = 1) -> None:
    assert outcome.exit_code == code, (outcome.exit_code, outcome.stderr)
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith("llamactl: error: "), lines[0]
    assert "Traceback" not in outcome.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert outcome.stdout == ""


ROOT = Path(__file__).resolve().parents[2]


def run_process(
    *args: str,
    input: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> Outcome:
    """The real CLI in a child process (`python -m llamactl`): its own stdin (not a terminal), exit
    status, signal handling and start-up, with LLAMACTL_HOME and plugins as the test set them."""
    import os
    import subprocess
    import sys

    full_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", COLUMNS="200") | (env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "llamactl", *args],
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )
    return Outcome(proc.returncode, proc.stdout, proc.stderr)
