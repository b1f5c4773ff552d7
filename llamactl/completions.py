"""Shell completion scripts for bash, zsh and fish, generated from the Typer app.

Typer's scripts are thin shims that ask `llamactl` itself for candidates at completion
time, so commands added by plugins complete too. `python -m llamactl.completions DIR`
rewrites the files shipped in completions/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from typer._completion_shared import get_completion_script

SHELLS = {"bash": "llamactl.bash", "zsh": "_llamactl", "fish": "llamactl.fish"}
COMPLETE_VAR = "_LLAMACTL_COMPLETE"


def completion_script(shell: str) -> str:
    return get_completion_script(prog_name="llamactl", complete_var=COMPLETE_VAR, shell=shell).rstrip("\n") + "\n"


def write_completions(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for shell, name in SHELLS.items():
        path = directory / name
        path.write_text(completion_script(shell))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_completions(Path(sys.argv[1] if len(sys.argv) > 1 else "completions")):
        print(path)
