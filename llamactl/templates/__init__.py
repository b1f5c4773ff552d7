"""Chat templates: how a dialog becomes the exact token ids a chat model was trained on.

A template is an object with a `name` and `encode(tokenizer, dialog) -> ids` (the prompt
for a dialog ending with the user's message); it may add `text` (a description for /show)
and `encode_history` (ids of a dialog ending with an answer). Templates register through
the plugin hook `register_chat_templates`, the built-in Llama 2 one (`llama2.py`) too; a
plugin may still register a plain function `encode(tokenizer, dialog) -> ids`.
A checkpoint's own jinja `chat_template` is rendered as transformers renders it (`jinja.py`);
`choose_template` decides which template a model runs with. Dialogs themselves (messages,
JSON files) are `dialog.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from llamactl.errors import LlamactlError
from llamactl.plugins import get_registry
from llamactl.templates import llama2
from llamactl.templates.dialog import (
    ROLES,
    SPECIAL_TAGS,
    Dialog,
    DialogError,
    Message,
    Role,
    check_special_tags,
    dialog_to_json,
    load_dialog,
    parse_dialog,
    save_dialog,
    validate_dialog,
)
from llamactl.templates.jinja import CHATML, OWN, JinjaTemplate, TemplateError
from llamactl.templates.llama2 import LLAMA2_CHAT, is_llama2_template

DEFAULT_TEMPLATE = llama2.NAME


class ChatTemplate(Protocol):
    name: str

    def encode(self, tokenizer: Any, dialog: Sequence[Message]) -> list[int]:
        """Prompt ids for `dialog`, which ends with the user's message."""
        ...


@dataclass(frozen=True)
class FunctionTemplate:
    """A template a plugin registered as a plain function `encode(tokenizer, dialog) -> ids`."""

    name: str
    function: Callable[[Any, Sequence[Message]], list[int]]

    def encode(self, tokenizer: Any, dialog: Sequence[Message]) -> list[int]:
        return self.function(tokenizer, dialog)


class UnknownTemplateError(LlamactlError):
    """No chat template is registered under a name."""

    exit_code = 2

    def __init__(self, name: str, choices: Sequence[str]) -> None:
        self.name, self.choices = name, list(choices)
        super().__init__(f"unknown chat template {name!r}; choose one of: {', '.join(self.choices)}")


def as_template(name: str, registered: Any) -> ChatTemplate:
    """What a plugin registered under `name` as a template object."""
    return registered if hasattr(registered, "encode") else FunctionTemplate(name, registered)


def get_template(name: str = DEFAULT_TEMPLATE) -> ChatTemplate:
    """The template registered under `name` (the built-in llama-2-chat or a plugin's)."""
    templates = get_registry().chat_templates()
    if name not in templates:
        raise UnknownTemplateError(name, sorted(templates))
    return as_template(name, templates[name])


def choose_template(name: str | None, own: str | None, where: str) -> ChatTemplate:
    """The template a model runs with: `name` when given (`--template`), else its own.

    A checkpoint's own template (`own`, the jinja text found at `where`) is rendered in the
    sandbox, except Llama 2's, which the token-exact built-in encodes; a checkpoint without
    one (Meta's downloads, most Llama 2 conversions) gets the Llama 2 template.
    `name` "checkpoint" asks for the checkpoint's own rendered as jinja, whatever it is.
    """
    if name == OWN:
        if own is None:
            raise LlamactlError(f"{where}: the model carries no chat template of its own (--template {OWN})")
        return JinjaTemplate(OWN, own, where)
    if name is not None:
        return get_template(name)
    if own is None or is_llama2_template(own):
        return LLAMA2_CHAT
    return JinjaTemplate(OWN, own, where)


def describe_template(template: ChatTemplate) -> str:
    """One line for `info` / `show`: which template and where it comes from."""
    if isinstance(template, JinjaTemplate) and template.name == OWN:
        return f"the model's own jinja template ({template.where})"
    if template is LLAMA2_CHAT:
        return f"{template.name} (built-in, token-exact with Meta's chat_completion)"
    return template.name


def encode_with(template: ChatTemplate, tokenizer: Any, dialog: Sequence[Message]) -> list[int]:
    """Ids of `dialog` as far as it goes: the template's prompt when it ends with the user;
    otherwise its finished exchanges, by the template's `encode_history` where it has one,
    else in Llama 2's format."""
    history = getattr(template, "encode_history", llama2.encode_history)
    if not dialog or dialog[-1].role != "user":
        return history(tokenizer, dialog)
    return template.encode(tokenizer, dialog)


__all__ = [
    "CHATML",
    "DEFAULT_TEMPLATE",
    "LLAMA2_CHAT",
    "OWN",
    "ROLES",
    "SPECIAL_TAGS",
    "ChatTemplate",
    "Dialog",
    "DialogError",
    "FunctionTemplate",
    "JinjaTemplate",
    "Message",
    "Role",
    "TemplateError",
    "UnknownTemplateError",
    "as_template",
    "check_special_tags",
    "choose_template",
    "describe_template",
    "dialog_to_json",
    "encode_with",
    "get_template",
    "load_dialog",
    "parse_dialog",
    "save_dialog",
    "validate_dialog",
]
