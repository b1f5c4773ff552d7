"""README stays true: every command is documented and --help works for each."""

from __future__ import annotations

from pathlib import Path

from llamactl.cli import build_app
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
