"""Fixtures: the tiny trained tokenizer and Meta's Llama 2 tokenizer."""

from __future__ import annotations

import pytest

from llamactl.tokenizer import SentencePieceTokenizer
from tests._chat_util import LLAMA2_TOKENIZER, need, train_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def llama2() -> SentencePieceTokenizer:
    need(LLAMA2_TOKENIZER)
    return SentencePieceTokenizer(LLAMA2_TOKENIZER)
