"""Meta's Llama 2 chat template, token for token.

The encoding is Meta's `chat_completion` (facebookresearch/llama, llama/generation.py):
a system message is folded into the first user message between `<<SYS>>\\n` and
`\\n<</SYS>>\\n\\n`; every finished exchange is its own SentencePiece call
`[INST] {user} [/INST] {answer} ` framed by the BOS and EOS *ids*; the pending user
message is `[INST] {user} [/INST]` after a BOS id. Getting one space or id wrong silently
degrades a chat model, so this module is the only place that knows the template.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from llamactl.plugins import hookimpl
from llamactl.templates.dialog import Message, validate_dialog

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
NAME = "llama-2-chat"
# Hugging Face's meta-llama/Llama-2-*-chat-hf tokenizer_config.json `chat_template`, verbatim.
HF_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

TEXT = "<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST]"


class _Encoder(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


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


@dataclass(frozen=True)
class Llama2Chat:
    """The template as an object: `name`, `text` (what /show prints), `encode`, `encode_history`."""

    name: str = NAME
    text: str = TEXT
    source: str = HF_TEMPLATE  # the same template in jinja, as written into HF and GGUF output

    def encode(self, tokenizer: _Encoder, dialog: Sequence[Message]) -> list[int]:
        return encode_dialog(tokenizer, dialog)

    def encode_history(self, tokenizer: _Encoder, dialog: Sequence[Message]) -> list[int]:
        return encode_history(tokenizer, dialog)


LLAMA2_CHAT = Llama2Chat()


@hookimpl
def register_chat_templates(register: Callable[[Any], None]) -> None:
    register(LLAMA2_CHAT)


def is_llama2_template(source: str) -> bool:
    """Whether a checkpoint's jinja template is Llama 2's own (then the token-exact encoder runs it)."""
    return source.strip() == HF_TEMPLATE
