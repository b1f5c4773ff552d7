"""Chat templates written in jinja (a checkpoint's own `chat_template`), rendered as transformers renders them.

A Hugging Face tokenizer_config.json or a GGUF's `tokenizer.chat_template` holds a jinja
program that turns the messages into the prompt text. It is untrusted code, so it runs in
jinja2's ImmutableSandboxedEnvironment with exactly transformers' settings
(utils/chat_template_utils.py `_compile_jinja_template`): trim_blocks, lstrip_blocks, the
loopcontrols extension, a `tojson` that does not escape HTML, and the globals
`raise_exception`, `strftime_now`, `dict` and `namespace` (the latter refusing underscore
names); the special tokens (`bos_token`, `eos_token`, ...) as strings, `messages`,
`add_generation_prompt`. The text is then encoded as `apply_chat_template` encodes it: special
token strings are those tokens and nothing is added around it (`Tokenizer.encode_chat`).

This module also registers `chatml` (the common `<|im_start|>role` format) through the same
hook as the built-in Llama 2 template.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from llamactl.errors import LlamactlError
from llamactl.plugins import hookimpl
from llamactl.templates.dialog import DialogError, Message, validate_dialog

OWN = "checkpoint"  # the name a checkpoint's own template goes by (`--template checkpoint`)

CHATML_TEXT = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(LlamactlError):
    """A jinja chat template does not compile, or refuses a dialog (its raise_exception)."""


@functools.lru_cache(maxsize=8)
def compile_template(source: str, where: str) -> Any:
    """The compiled template, in the sandbox transformers uses (cached: sessions render every turn)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateDict:
        # transformers' limited dict(): no attribute access to break out through
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # Namespaces refuse underscore names, which lead to CPython internals.
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a template may not store {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    env.globals.update(dict=TemplateDict(), namespace=TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as exc:
        raise TemplateError(f"{where}: the chat template does not compile ({exc})") from None


def special_tokens(tokenizer: Any) -> dict[str, str]:
    """bos_token / eos_token / unk_token / pad_token as strings, as transformers passes them."""
    out = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, str):
            out[name] = value
    return out


@dataclass(frozen=True)
class JinjaTemplate:
    """A jinja chat template: `name`, `source` (the jinja text), `where` it came from."""

    name: str
    source: str
    where: str = "chat template"

    @property
    def text(self) -> str:
        """What /show prints."""
        return self.source

    def render(self, tokenizer: Any, dialog: Sequence[Message], add_generation_prompt: bool) -> str:
        import jinja2

        messages = [{"role": m.role, "content": m.content} for m in dialog]
        template = compile_template(self.source, self.where)
        try:
            return str(
                template.render(
                    messages=messages,
                    tools=None,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **special_tokens(tokenizer),
                )
            )
        except jinja2.exceptions.TemplateError as exc:
            raise TemplateError(f"{self.where}: the chat template refused the dialog ({exc})") from None

    def encode(self, tokenizer: Any, dialog: Sequence[Message]) -> list[int]:
        """Prompt ids for a dialog ending with the user's message, the assistant's turn opened."""
        validate_dialog(dialog, pending=True)
        check_special_tokens(tokenizer, dialog)
        return _encode_text(tokenizer, self.render(tokenizer, dialog, add_generation_prompt=True))

    def encode_history(self, tokenizer: Any, dialog: Sequence[Message]) -> list[int]:
        """Ids of a dialog as far as it goes (a prompt when it ends with the user)."""
        validate_dialog(dialog, pending=False)
        if dialog and dialog[-1].role == "user":
            return self.encode(tokenizer, dialog)
        return _encode_text(tokenizer, self.render(tokenizer, dialog, add_generation_prompt=False))


def check_special_tokens(tokenizer: Any, dialog: Sequence[Message]) -> None:
    """Refuse a user or system message holding a special token's text (`<|im_end|>`, `</s>`):
    the rendered prompt is read with special tokens parsed, so such text would forge turns,
    as `[INST]` would in Llama 2's format (which Meta refuses, and so does `dialog.py`)."""
    specials = getattr(tokenizer, "special_tokens", ())
    for index, message in enumerate(dialog, start=1):
        if message.role == "assistant":
            continue
        for token in specials:
            if token and token in message.content:
                raise DialogError(
                    f"message {index} ({message.role}): contains the special token {token!r}, "
                    "which is not allowed in a message"
                )


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    encode_chat = getattr(tokenizer, "encode_chat", None)
    return list(encode_chat(text)) if encode_chat is not None else list(tokenizer.encode(text))


CHATML = JinjaTemplate("chatml", CHATML_TEXT, "the chatml template")


@hookimpl
def register_chat_templates(register: Callable[[Any], None]) -> None:
    register(CHATML)
