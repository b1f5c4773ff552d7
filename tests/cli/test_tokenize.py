"""`llamactl tokenize`: ids for text and dialogs, checked against SentencePiece and Meta's rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from tests._chat_util import LLAMA2_TOKENIZER, need, tiny_checkpoint
from tests.cli._run import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    need(LLAMA2_TOKENIZER)
    return spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))


def tokenize(*args: str, input: str | None = None):
    return run_cli("tokenize", *args, "--tokenizer", str(LLAMA2_TOKENIZER), input=input)


def test_text_ids(sp: spm.SentencePieceProcessor) -> None:
    out = tokenize("[INST]", "--no-bos")
    assert out.exit_code == 0 and out.stdout == "518 25580 29962\n"
    text = "Hello 🦙 world 42"
    assert tokenize(text).stdout == " ".join(map(str, [1, *sp.encode(text)])) + "\n"
    assert json.loads(tokenize(text, "--json").stdout) == [1, *sp.encode(text)]
    assert tokenize(input=text + "\n").stdout == tokenize(text).stdout  # stdin


def test_pieces(sp: spm.SentencePieceProcessor) -> None:
    out = tokenize("Hi 🦙", "--pieces")
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    ids = [1, *sp.encode("Hi 🦙")]
    assert rows == [[str(i), sp.id_to_piece(i)] for i in ids]
    assert json.loads(tokenize("Hi", "--pieces", "--json").stdout)[1] == {"id": 6324, "piece": "▁Hi"}


def test_chat_dialog_matches_meta_rules(sp: spm.SentencePieceProcessor, tmp_path: Path) -> None:
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dialog))
    want = [
        1,
        *sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! "),
        2,
        1,
        *sp.encode("[INST] Bye [/INST]"),
    ]
    out = tokenize("--chat", str(path), "--json")
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout) == want


def test_model_tokenizer(tmp_path: Path) -> None:
    path, _ = tiny_checkpoint(tmp_path, gqa=False)
    raw = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    out = run_cli("tokenize", "once upon", "--model", str(path), "--no-bos", "--json")
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout) == raw.encode("once upon")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[{", "malformed JSON"),
        ('[{"role": "assistant", "content": "a"}]', "'user' was expected"),
        ('[{"role": "user", "content": "x [INST] y"}]', "template marker"),
    ],
)
def test_bad_dialogs(sp: spm.SentencePieceProcessor, tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert_one_line_error(tokenize("--chat", str(path)), str(path), fragment)


def test_usage_errors(sp: spm.SentencePieceProcessor, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("tokenize", "hi"), "exactly one of --model", code=2)
    path = tmp_path / "d.json"
    path.write_text("[]")
    assert_one_line_error(tokenize("hi", "--chat", str(path)), "not both", code=2)
    assert_one_line_error(run_cli("tokenize", "hi", "--tokenizer", str(tmp_path / "none.model")), "not found")
