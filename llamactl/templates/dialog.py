"""Dialogs: messages, the rules they follow, and the messages JSON format (parse, load, save).

A dialog is an optional system message, then user and assistant messages alternating. The
JSON form is the common one: a list of {"role", "content"} objects (optionally under
"messages"); an answer cut short carries "cut": true.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llamactl import jsonio
from llamactl.errors import LlamactlError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# Meta's chat_completion refuses any message holding a marker of the Llama 2 template
# (llama2.py frames turns with them), or a user could forge turns. Every dialog is held to
# that rule, whichever template encodes it.
SPECIAL_TAGS: tuple[str, ...] = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


class DialogError(LlamactlError):
    """A dialog is malformed: bad JSON, unknown role, roles out of order, special tags."""


@dataclass(frozen=True)
class Message:
    """One turn. `cut` marks an answer interrupted before the model finished it."""

    role: Role
    content: str
    cut: bool = False

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.cut:
            data["cut"] = True
        return data


Dialog = list[Message]


def check_special_tags(text: str, source: str) -> None:
    """Refuse text that would forge template markers, as Meta's chat_completion refuses it."""
    for tag in SPECIAL_TAGS:
        if tag in text:
            raise DialogError(f"{source}: contains the template marker {tag!r}, which is not allowed in a message")


def validate_dialog(dialog: Sequence[Message], *, pending: bool = True, source: str = "dialog") -> None:
    """Roles must be: optional system, then user/assistant alternating, ending with user when `pending`.

    With `pending=False` the dialog may also end with an assistant answer (or be empty /
    only a system prompt): a conversation history rather than a prompt.
    """
    messages = list(dialog)
    if messages and messages[0].role == "system":
        messages = messages[1:]
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise DialogError(f"{source}: unknown role {message.role!r}; use system, user or assistant")
        expected = "user" if index % 2 == 0 else "assistant"
        if message.role != expected:
            position = index + (len(dialog) - len(messages)) + 1
            raise DialogError(
                f"{source}: message {position} has role {message.role!r} but {expected!r} was expected "
                "(roles go: optional system, then user and assistant alternating, ending with user)"
            )
    if pending and (not messages or messages[-1].role != "user"):
        raise DialogError(f"{source}: the last message must be from the user")
    for index, message in enumerate(dialog):
        if message.role != "assistant":
            check_special_tags(message.content, f"{source}: message {index + 1} ({message.role})")


def parse_dialog(data: Any, source: str) -> Dialog:
    """A dialog from the common messages JSON: a list of {"role", "content"} objects."""
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        data = data["messages"]
    if not isinstance(data, list):
        raise DialogError(f"{source}: expected a JSON list of {{'role', 'content'}} messages")
    dialog: Dialog = []
    for index, item in enumerate(data, start=1):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise DialogError(f"{source}: message {index} must be an object with 'role' and 'content'")
        role, content = item["role"], item["content"]
        if role not in ROLES:
            raise DialogError(f"{source}: message {index} has unknown role {role!r}; use system, user or assistant")
        if not isinstance(content, str):
            raise DialogError(f"{source}: message {index} content must be a string")
        if role == "system" and index != 1:
            raise DialogError(f"{source}: message {index} is a system message; only the first message may be one")
        dialog.append(Message(role, content, cut=bool(item.get("cut", False))))
    validate_dialog(dialog, pending=False, source=source)
    return dialog


def load_dialog(path: str | Path) -> Dialog:
    """Read a messages JSON file; every problem is a DialogError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DialogError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DialogError(f"{path}: cannot read: {exc}") from None
    try:
        data = jsonio.loads(text)
    except ValueError as exc:  # malformed, nested too deeply, an integer of 5000 digits
        raise DialogError(f"{path}: {exc}") from None
    return parse_dialog(data, str(path))


def dialog_to_json(dialog: Iterable[Message]) -> str:
    return json.dumps([m.to_dict() for m in dialog], indent=2, ensure_ascii=False) + "\n"


def save_dialog(path: str | Path, dialog: Iterable[Message]) -> None:
    """Write the messages JSON atomically (a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(dialog_to_json(dialog), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DialogError(f"{path}: cannot write: {exc.strerror or exc}") from None
