"""The Llama 2 chat template against a reference written from Meta's rules, on the real tokenizer.

The reference calls SentencePiece directly and spells every string out literally, so it
shares no code with llamactl.chat: one misplaced space, newline, BOS or EOS fails it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from llamactl.chat import (
    DialogError,
    Message,
    encode_dialog,
    encode_history,
    load_dialog,
    parse_dialog,
    save_dialog,
)
from llamactl.tokenizer import Tokenizer
from tests._chat_util import LLAMA2_TOKENIZER

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip("../shared/fixtures/llama2-tokenizer.model is absent")
    return spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))


@pytest.fixture(scope="module")
def tok(sp: spm.SentencePieceProcessor) -> Tokenizer:
    return Tokenizer(LLAMA2_TOKENIZER)


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
