"""Texts and tokenizers the tokenizer tests share."""

from __future__ import annotations

from llamactl.tokenizer import SentencePieceTokenizer, Tokenizer
from tests._chat_util import LLAMA2_TOKENIZER, STORIES

TEXTS = [
    "Hello world",
    "Emoji 😀 in the middle 🎉🎉 and at the end 🦙",
    "日本語のテキストと中文字符 mixed with English",
    "Digits 1234567890 and 3.14159, then   spaces\nand\nnewlines\n",
    "Accents: café, naïve, Zürich; combining e\u0301; flags 🇫🇷; ZWJ family 👨‍👩‍👧",
    " leading space and trailing space ",
]


def tokenizers(tiny: Tokenizer) -> list[Tokenizer]:
    """The tiny trained tokenizer plus the real ones when the fixtures are present."""
    out = [tiny]
    if LLAMA2_TOKENIZER.is_file():
        out.append(SentencePieceTokenizer(LLAMA2_TOKENIZER))
    if (STORIES / "tokenizer.model").is_file():
        out.append(SentencePieceTokenizer(STORIES / "tokenizer.model"))
    return out
