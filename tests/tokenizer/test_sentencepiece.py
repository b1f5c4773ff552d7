"""The SentencePiece tokenizer behind the Tokenizer protocol, checked against SentencePiece itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm

from llamactl.tokenizer import (
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    check_model_vocab,
    load_tokenizer,
    open_tokenizer,
)
from tests.tokenizer._util import TEXTS, tokenizers


def test_llama2_known_ids(llama2: Tokenizer) -> None:
    # Facts quoted in ../shared/fixtures/README.md.
    assert (llama2.vocab_size, llama2.bos_id, llama2.eos_id) == (32000, 1, 2)
    assert llama2.encode("[INST]") == [518, 25580, 29962]
    assert llama2.encode("[INST]", bos=True, eos=True) == [1, 518, 25580, 29962, 2]


def test_encode_decode_match_sentencepiece(tiny: Tokenizer) -> None:
    for tok in tokenizers(tiny):
        raw = spm.SentencePieceProcessor(model_file=str(tok.path))
        for text in TEXTS:
            assert tok.encode(text) == raw.encode(text)
            assert tok.decode(tok.encode(text, bos=True, eos=True)) == raw.decode(raw.encode(text))


def test_emoji_needs_byte_fallback_in_tiny_vocab(tiny: Tokenizer) -> None:
    ids = tiny.encode("🦙")
    assert sum(tiny.sp.is_byte(i) for i in ids) == 4  # F0 9F A6 99: split over four tokens


def test_missing_and_bad_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(bad)


def test_vocab_mismatch_is_refused(tiny: Tokenizer) -> None:
    check_model_vocab(tiny, tiny.vocab_size, "m", tiny.path)
    with pytest.raises(TokenizerError, match=r"320 pieces but model m has a vocabulary of 512"):
        check_model_vocab(tiny, 512, "m", tiny.path)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tiny.check_ids([1, 320])


def test_tokenizer_is_a_protocol_and_load_tokenizer_opens_one(tiny: Tokenizer) -> None:
    assert isinstance(tiny, SentencePieceTokenizer) and isinstance(tiny, Tokenizer)
    assert not isinstance(object(), Tokenizer)
    again = load_tokenizer(tiny.path)
    assert isinstance(again, SentencePieceTokenizer) and again.encode("hello") == tiny.encode("hello")


def test_open_tokenizer_checks_the_vocabulary_against_the_model(tiny: Tokenizer, tmp_path: Path) -> None:
    assert open_tokenizer(None, tiny.path, tmp_path, tiny.vocab_size).vocab_size == tiny.vocab_size
    with pytest.raises(TokenizerError, match="vocabulary of 512"):
        open_tokenizer(tiny.path, None, tmp_path, 512)
    with pytest.raises(TokenizerError, match=r"no tokenizer\.model or tokenizer\.json next to the weights"):
        open_tokenizer(None, None, tmp_path, 512)
