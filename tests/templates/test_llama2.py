"""The Llama 2 chat template against a reference written from Meta's rules, on the real tokenizer.

The reference calls SentencePiece directly and spells every string out literally, so it
shares no code with llamactl.templates: one misplaced space, newline, BOS or EOS fails it.
"""

from __future__ import annotations

import pytest
import sentencepiece as spm

from llamactl.templates import SPECIAL_TAGS, DialogError, Message
from llamactl.templates.llama2 import B_INST, B_SYS, E_INST, E_SYS, LLAMA2_CHAT, encode_dialog, encode_history
from llamactl.tokenizer import Tokenizer, load_tokenizer
from tests._chat_util import LLAMA2_TOKENIZER, need

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    need(LLAMA2_TOKENIZER)
    return spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))


@pytest.fixture(scope="module")
def tok(sp: spm.SentencePieceProcessor) -> Tokenizer:
    return load_tokenizer(LLAMA2_TOKENIZER)


def d(*pairs: tuple[str, str]) -> list[Message]:
    return [Message(role, content) for role, content in pairs]  # type: ignore[arg-type]


def test_single_turn(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    want = [BOS, *sp.encode("[INST] What is the capital of France? [/INST]")]
    assert encode_dialog(tok, d(("user", "  What is the capital of France?\n"))) == want
    assert want[:4] == [1, 518, 25580, 29962]  # "[INST]" ids quoted in the fixtures README


def test_system_prompt(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    dialog = d(("system", "Always answer with Haiku"), ("user", "I am going to Paris, what should I see?"))
    text = "[INST] <<SYS>>\nAlways answer with Haiku\n<</SYS>>\n\nI am going to Paris, what should I see? [/INST]"
    assert encode_dialog(tok, dialog) == [BOS, *sp.encode(text)]


def test_multi_turn(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    dialog = d(
        ("user", "I am going to Paris, what should I see?"),
        ("assistant", " Paris has the Eiffel Tower.\n\n"),
        ("user", "What is so great about #1?"),
    )
    want = [
        BOS,
        *sp.encode("[INST] I am going to Paris, what should I see? [/INST] Paris has the Eiffel Tower. "),
        EOS,
        BOS,
        *sp.encode("[INST] What is so great about #1? [/INST]"),
    ]
    assert encode_dialog(tok, dialog) == want


def test_multi_turn_with_system(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    dialog = d(
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello!"),
        ("user", "Bye"),
        ("assistant", "Goodbye."),
        ("user", "🦙?"),
    )
    want = [
        BOS,
        *sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! "),
        EOS,
        BOS,
        *sp.encode("[INST] Bye [/INST] Goodbye. "),
        EOS,
        BOS,
        *sp.encode("[INST] 🦙? [/INST]"),
    ]
    ids = encode_dialog(tok, dialog)
    assert ids == want
    assert ids.count(BOS) == 3 and ids.count(EOS) == 2  # ids, not the text "<s>"
    assert "<s>" not in tok.decode(ids)


def test_history_ending_with_answer(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    dialog = d(("user", "Hi"), ("assistant", "Hello!"))
    assert encode_history(tok, dialog) == [BOS, *sp.encode("[INST] Hi [/INST] Hello! "), EOS]
    assert encode_history(tok, []) == []


@pytest.mark.parametrize(
    "roles",
    [
        ("assistant", "user"),
        ("user", "user"),
        ("system", "assistant"),
        ("user", "assistant"),  # must end with the user for a prompt
        ("system",),
        ("user", "system", "user"),
    ],
)
def test_roles_out_of_order(tok: Tokenizer, roles: tuple[str, ...]) -> None:
    with pytest.raises(DialogError):
        encode_dialog(tok, [Message(r, "x") for r in roles])  # type: ignore[arg-type]


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
def test_special_tags_refused(tok: Tokenizer, tag: str) -> None:
    with pytest.raises(DialogError, match="template marker"):
        encode_dialog(tok, d(("user", f"please {tag} ignore that")))
    with pytest.raises(DialogError, match="template marker"):
        encode_dialog(tok, d(("system", f"sys {tag}"), ("user", "hi")))


def test_the_refused_markers_are_the_templates_own() -> None:
    assert set(SPECIAL_TAGS) == {B_INST, E_INST, B_SYS.strip(), E_SYS.strip()}


def test_the_template_object_encodes_as_the_functions(tok: Tokenizer) -> None:
    dialog = d(("system", "S"), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"))
    assert LLAMA2_CHAT.name == "llama-2-chat"
    assert LLAMA2_CHAT.encode(tok, dialog) == encode_dialog(tok, dialog)
    assert LLAMA2_CHAT.encode_history(tok, dialog[:3]) == encode_history(tok, dialog[:3])
