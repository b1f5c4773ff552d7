"""Llama 2 chat dialogs and their exact token encoding.

The encoding is Meta's `chat_completion` (facebookresearch/llama, llama/generation.py):
a system message is folded into the first user message between `<<SYS>>\\n` and
`\\n<</SYS>>\\n\\n`; every finished exchange is its own SentencePiece call
`[INST] {user} [/INST] {answer} ` framed by the BOS and EOS *ids*; the pending user
message is `[INST] {user} [/INST]` after a BOS id. Getting one space or id wrong silently
degrades a chat model, so this module is the only place that knows the template.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from llamactl.errors import LlamactlError, UsageError
from llamactl.plugins import get_registry, hookimpl

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS: tuple[str, ...] = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
TEMPLATE_NAME = "llama-2-chat"
TEMPLATE_TEXT = "<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST]"


class DialogError(LlamactlError):
    """A dialog is malformed: bad JSON, unknown role, roles out of order, special tags."""


class _Encoder(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


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


def _fold_system(dialog: Sequence[Message]) -> list[Message]:
    if dialog and dialog[0].role == "system":
        if len(dialog) == 1:
            return []
        first = dialog[1]
        return [Message(first.role, B_SYS + dialog[0].content + E_SYS + first.content), *dialog[2:]]
    return list(dialog)


def encode_exchanges(tokenizer: _Encoder, dialog: Sequence[Message]) -> list[int]:
    """Ids of every finished user/assistant exchange, each `BOS [INST] u [/INST] a EOS`."""
    folded = _fold_system(dialog)
    ids: list[int] = []
    for user, answer in zip(folded[::2], folded[1::2]):
        text = f"{B_INST} {user.content.strip()} {E_INST} {answer.content.strip()} "
        ids += tokenizer.encode(text, bos=True, eos=True)
    return ids


def encode_dialog(tokenizer: _Encoder, dialog: Sequence[Message]) -> list[int]:
    """The exact prompt ids Meta's chat_completion feeds the model for `dialog`.

    The dialog must end with a user message; `encode_history` encodes one that does not.
    """
    validate_dialog(dialog, pending=True)
    folded = _fold_system(dialog)
    ids = encode_exchanges(tokenizer, dialog)
    ids += tokenizer.encode(f"{B_INST} {folded[-1].content.strip()} {E_INST}", bos=True, eos=False)
    return ids


def encode_history(tokenizer: _Encoder, dialog: Sequence[Message]) -> list[int]:
    """Ids of a dialog as far as it goes: a prompt when it ends with the user, else the exchanges."""
    validate_dialog(dialog, pending=False)
    if dialog and dialog[-1].role == "user":
        return encode_dialog(tokenizer, dialog)
    return encode_exchanges(tokenizer, dialog)


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
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DialogError(f"{path}: malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
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


ChatTemplate = Callable[[Any, Sequence[Message]], list[int]]


def encode_with(encode: ChatTemplate, tokenizer: Any, dialog: Sequence[Message]) -> list[int]:
    """A prompt through `encode` when the dialog ends with the user; otherwise the history
    as far as it goes (the built-in template's exchanges)."""
    if encode is encode_dialog or not dialog or dialog[-1].role != "user":
        return encode_history(tokenizer, dialog)
    return encode(tokenizer, dialog)


def chat_template(name: str) -> ChatTemplate:
    """The encoder registered under `name`: the built-in llama-2-chat or a plugin's."""
    if name == TEMPLATE_NAME:
        return encode_dialog
    templates = get_registry().chat_templates()
    if name not in templates:
        raise UsageError(f"--template {name}: unknown chat template; choose one of: {', '.join(sorted(templates))}")
    return templates[name]


@hookimpl
def register_chat_templates(register: Callable[[str, ChatTemplate], None]) -> None:
    register(TEMPLATE_NAME, encode_dialog)
