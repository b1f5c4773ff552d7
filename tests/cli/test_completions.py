"""Shipped completion scripts match the app, and completion really lists the commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamactl.completions import SHELLS, completion_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_shipped_script_is_current(shell: str) -> None:
    shipped = (ROOT / "completions" / SHELLS[shell]).read_text()
    assert shipped == completion_script(shell), (
        f"completions/{SHELLS[shell]} is stale: run python -m llamactl.completions"
    )


def _complete(words: str) -> list[str]:
    env = os.environ | {
        "_LLAMACTL_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
    }
    proc = subprocess.run([sys.executable, "-m", "llamactl"], env=env, capture_output=True, text=True, cwd=ROOT)
    return proc.stdout.split()


def test_bash_completion_lists_every_command() -> None:
    from llamactl.cli import build_app

    commands = {c.name for c in build_app().registered_commands}
    assert {"convert", "info"} <= commands
    assert commands <= set(_complete("llamactl "))
    assert "--to" in _complete("llamactl convert a b --t")
