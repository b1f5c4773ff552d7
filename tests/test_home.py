from __future__ import annotations

from pathlib import Path

import pytest

from llamactl import home
from llamactl.errors import ConfigError


def test_everything_lives_under_llamactl_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path / "h"))
    root = tmp_path / "h"
    assert home.llamactl_home() == root
    assert home.models_home() == root / "models"
    assert home.hash_cache_file() == root / "cache" / "sha256.json"
    assert home.chat_history_file() == root / "chat_history"
    assert home.cache_dir("compile") == root / "cache" / "compile"


def test_default_is_the_user_data_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    from platformdirs import user_data_dir

    monkeypatch.delenv("LLAMACTL_HOME", raising=False)
    assert home.llamactl_home() == Path(user_data_dir("llamactl"))


def test_a_home_that_is_a_file_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path / "f"))
    with pytest.raises(ConfigError, match="LLAMACTL_HOME points at a file"):
        home.models_home()
