"""Dialogs: the messages JSON format, its errors naming the file, atomic saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamactl.templates import DialogError, Message, load_dialog, parse_dialog, save_dialog


def d(*pairs: tuple[str, str]) -> list[Message]:
    return [Message(role, content) for role, content in pairs]  # type: ignore[arg-type]


def test_parse_messages_json(tmp_path: Path) -> None:
    path = tmp_path / "dialog.json"
    path.write_text(json.dumps([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]))
    assert load_dialog(path) == d(("system", "S"), ("user", "U"))
    assert parse_dialog({"messages": [{"role": "user", "content": "U"}]}, "x") == d(("user", "U"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{", "malformed JSON"),
        ('{"role": "user"}', "expected a JSON list"),
        ('[{"role": "user"}]', "message 1 must be an object with 'role' and 'content'"),
        ('[{"role": "bot", "content": "x"}]', "unknown role 'bot'"),
        ('[{"role": "user", "content": 3}]', "content must be a string"),
        ('[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]', "message 2 has role 'user'"),
        ('[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]', "only the first message"),
    ],
)
def test_bad_dialog_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DialogError, match=message) as info:
        load_dialog(path)
    assert str(path) in str(info.value)
    assert path.read_text() == content  # input untouched


def test_missing_dialog_file(tmp_path: Path) -> None:
    with pytest.raises(DialogError, match="file not found"):
        load_dialog(tmp_path / "none.json")


def test_save_and_load_round_trip_keeps_cut_flag(tmp_path: Path) -> None:
    dialog = [Message("system", "S"), Message("user", "U ünïcode 🦙"), Message("assistant", "part", cut=True)]
    path = tmp_path / "out.json"
    save_dialog(path, dialog)
    assert load_dialog(path) == dialog
    assert json.loads(path.read_text())[2] == {"role": "assistant", "content": "part", "cut": True}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left
