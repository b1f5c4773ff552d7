"""The store under odd conditions: a file where a model should be, a home that is a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli._run import run_cli
from tests.hostile._contract import TIME_LIMIT_S, assert_refused

pytestmark = pytest.mark.timeout(TIME_LIMIT_S)


def test_rm_of_a_file_entry_removes_it_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path / "home"))
    models = tmp_path / "home" / "models"
    models.mkdir(parents=True)
    (models / "stray").write_text("not a model")
    outcome = run_cli("rm", "stray", "--yes")
    assert outcome.exit_code == 0, outcome.stderr
    assert list(models.iterdir()) == []  # neither the file nor a hidden .rm-stray-PID


def test_home_that_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "home").write_text("oops")
    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path / "home"))
    for command in (("list",), ("show", "x"), ("rm", "x", "--yes")):
        assert_refused(run_cli(*command), "LLAMACTL_HOME points at a file")
