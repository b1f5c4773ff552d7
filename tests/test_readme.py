"""README stays true: every command is documented and --help works for each; the cheap examples run
as written; tests that need ../shared/fixtures skip with the README's one wording."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llamactl.cli import build_app
from llamactl.home import models_home
from tests._ckpt import random_meta_state, tiny_args, write_meta_checkpoint
from tests.cli._run import run_cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_command_is_in_the_readme_and_has_help() -> None:
    for command in build_app().registered_commands:
        assert f"llamactl {command.name}" in README, f"README does not mention `llamactl {command.name}`"
        outcome = run_cli(command.name, "--help")
        assert outcome.exit_code == 0 and "Usage" in outcome.stdout, command.name


def test_readme_top_has_install_and_test_commands_ci_runs() -> None:
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    head = README[:1500]
    assert "pip install torch==2.13.0" in head and "pip install -e" in head
    assert "python -m pytest" in head and "python -m pytest" in ci
    assert "ruff check ." in head and "ruff check ." in ci


def sh_lines() -> list[str]:
    """Every command line of the README's ```sh blocks, trailing `# comment` removed."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
            if line:
                lines.append(line)
    return lines


# README examples cheap enough to run as written, in order, on stand-ins: `7b-chat` and `7b` are
# stories260K in a scratch store, `./stories260K` and `./my-finetune` are directories in a
# scratch working directory. (The rest need real 7B-70B checkpoints, a GPU or the Hub.)
CHEAP = [
    "llamactl import ./my-finetune mine",
    "llamactl import ./my-finetune mine2 --link",
    "llamactl import ./stories260K stories --ctx 512",
    "llamactl list --json",
    "llamactl show 7b-chat",
    "llamactl info 7b-chat --json",
    'llamactl chat 7b-chat -p "Hi" --json',
    'echo "Hi" | llamactl chat 7b-chat',
    'llamactl generate 7b "Once upon a time" -t 0 -n 64',
    "llamactl quantize 7b-chat --bits 4",
    "llamactl rm 7b-chat --yes --json",
]


def test_cheap_examples_are_in_the_readme_as_written() -> None:
    lines = sh_lines()
    for example in CHEAP:
        assert example in lines, f"README no longer has `{example}`: update CHEAP in tests/test_readme.py"


@pytest.mark.slow
def test_cheap_readme_examples_run_as_written(tmp_path: Path, stories_dir: Path, tiny_tokenizer: Path) -> None:
    exe = Path(sys.executable).with_name("llamactl")
    if not exe.is_file():
        pytest.skip(f"no llamactl console script beside {sys.executable} (pip install -e .)")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(stories_dir, work / "stories260K")
    args = tiny_args()
    write_meta_checkpoint(work / "my-finetune", args, random_meta_state(args), tokenizer=tiny_tokenizer)
    env = dict(os.environ, PATH=f"{exe.parent}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    for name in ("7b-chat", "7b"):  # the stand-ins, imported the way a user would
        assert run_cli("import", str(stories_dir), name, "--ctx", "512").exit_code == 0
    for example in CHEAP:
        proc = subprocess.run(["bash", "-c", example], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (example, proc.stderr)
        assert "Traceback" not in proc.stderr, (example, proc.stderr)
        if "--json" in example:
            json.loads(proc.stdout.splitlines()[0] if example.startswith("llamactl chat") else proc.stdout)
    assert not (models_home() / "7b-chat").exists() and (models_home() / "7b-chat-q4").is_dir()


def test_fixture_skips_have_one_wording(tmp_path: Path) -> None:
    """Every test that needs ../shared/fixtures skips through tests._chat_util.need, with its words."""
    from tests._chat_util import FIXTURES, need

    with pytest.raises(pytest.skip.Exception) as info:
        need(FIXTURES / "no-such-fixture.bin")
    assert str(info.value) == "needs ../shared/fixtures/no-such-fixture.bin (not present; README: Test fixtures)"
    assert "needs ../shared/fixtures/<file> (not present; README: Test fixtures)" in README
    root = Path(__file__).resolve().parents[1]
    for path in [*root.glob("tests/**/*.py"), *root.glob("plugins/*/tests/*.py")]:
        for call in re.findall(r"pytest\.skip\(([^)]*)\)", path.read_text()):
            if "fixture" in call or "shared" in call:
                assert "(not present; README: Test fixtures" in call or path.name == "_chat_util.py", (path, call)
