"""Template lookup by name through the plugin registry; plugin functions still work as templates."""

from __future__ import annotations

import pytest

from llamactl.templates import (
    DEFAULT_TEMPLATE,
    LLAMA2_CHAT,
    FunctionTemplate,
    Message,
    UnknownTemplateError,
    as_template,
    encode_with,
    get_template,
)


class Ids:
    """A tokenizer stand-in: one id per character, BOS 1, EOS 2."""

    bos_id, eos_id = 1, 2

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [1] * bos + [ord(c) for c in text] + [2] * eos


def test_the_builtin_template_comes_from_the_registry() -> None:
    assert DEFAULT_TEMPLATE == "llama-2-chat"
    assert get_template() is LLAMA2_CHAT and get_template("llama-2-chat") is LLAMA2_CHAT


def test_unknown_names_list_the_registered_ones() -> None:
    with pytest.raises(
        UnknownTemplateError, match="unknown chat template 'nope'; choose one of: chatml, llama-2-chat"
    ) as info:
        get_template("nope")
    assert info.value.choices == ["chatml", "llama-2-chat"] and info.value.exit_code == 2


def test_a_plain_function_is_a_template() -> None:
    def encode(tokenizer, dialog):
        return tokenizer.encode("USER: " + dialog[-1].content, bos=True)

    template = as_template("toy", encode)
    assert template == FunctionTemplate("toy", encode) and as_template("x", LLAMA2_CHAT) is LLAMA2_CHAT
    dialog = [Message("user", "hi")]
    assert template.encode(Ids(), dialog) == encode_with(template, Ids(), dialog) == Ids().encode("USER: hi", bos=True)
    # A history ending with an answer: a function template has none, so Llama 2's exchanges.
    history = [Message("user", "hi"), Message("assistant", "yo")]
    assert encode_with(template, Ids(), history) == LLAMA2_CHAT.encode_history(Ids(), history)
