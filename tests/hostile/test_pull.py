"""A hostile Hub: paths that climb out of the store, impossible sizes, garbage, redirect loops."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llamactl import pull
from llamactl.home import models_home
from tests._store_util import FakeHub
from tests.cli._run import run_cli
from tests.hostile._contract import TIME_LIMIT_S, assert_refused, snapshot

pytestmark = pytest.mark.timeout(TIME_LIMIT_S)
REPO = "evil/tiny"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(pull, "_RETRY_WAIT", 0.0)
    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path / "home"))
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.add_repo(REPO, {"config.json": b"{}", "model.safetensors": b"x" * 16})
        yield server


def _item(path: str, size: int = 2) -> dict[str, object]:
    return {"type": "file", "path": path, "size": size, "oid": "0" * 40}


@pytest.mark.parametrize(
    ("items", "why"),
    [
        ([_item("../../escaped")], "would be written outside the model"),
        ([_item("/etc/escaped")], "would be written outside the model"),
        ([_item("a/../../escaped")], "would be written outside the model"),
        ([_item("sub\\..\\..\\escaped")], "would be written outside the model"),
        ([_item(".llamactl-pull.json")], "would be written outside the model"),
        ([_item("config.json", size=-1)], "impossible size -1"),
        ([_item("a"), _item("a/b")], "lists both a file 'a' and 'a/b'"),
        ([_item("a"), _item("a")], "lists 'a' twice"),
    ],
    ids=["dotdot", "absolute", "inner-dotdot", "backslash", "state-file", "size", "file-and-dir", "twice"],
)
def test_hostile_listing_writes_nothing(hub: FakeHub, tmp_path: Path, items: list[dict[str, object]], why: str) -> None:
    hub.tree_items = items
    before = snapshot(tmp_path)
    assert_refused(run_cli("pull", REPO), REPO, why, root=tmp_path, before=before)
    assert not (tmp_path / "escaped").exists() and not Path("/etc/escaped").exists()
    assert not models_home().exists() or list(models_home().iterdir()) == []


def test_non_json_answer(hub: FakeHub, tmp_path: Path) -> None:
    hub.api_body = b"<html>not json</html>"
    assert_refused(run_cli("pull", REPO), REPO, "malformed answer")


def test_redirect_loop(hub: FakeHub, tmp_path: Path) -> None:
    hub.redirect_loop = True
    assert_refused(run_cli("pull", REPO), REPO, "redirected in a loop")
