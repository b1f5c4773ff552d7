"""Tokenizer wrapper and streaming detokenizer, checked against SentencePiece's own decode."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import sentencepiece as spm

from llamactl.tokenizer import StreamDecoder, Tokenizer, TokenizerError
from tests._chat_util import LLAMA2_TOKENIZER, STORIES, train_tiny_tokenizer

TEXTS = [
    "Hello world",
    "Emoji 😀 in the middle 🎉🎉 and at the end 🦙",
    "日本語のテキストと中文字符 mixed with English",
    "Digits 1234567890 and 3.14159, then   spaces\nand\nnewlines\n",
    "Accents: café, naïve, Zürich; combining e\u0301; flags 🇫🇷; ZWJ family 👨‍👩‍👧",
    " leading space and trailing space ",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def llama2() -> Tokenizer:
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip("../shared/fixtures/llama2-tokenizer.model is absent")
    return Tokenizer(LLAMA2_TOKENIZER)


def tokenizers(tiny: Tokenizer) -> list[Tokenizer]:
    """The tiny trained tokenizer plus the real ones when the fixtures are present."""
    out = [tiny]
    if LLAMA2_TOKENIZER.is_file():
        out.append(Tokenizer(LLAMA2_TOKENIZER))
    if (STORIES / "tokenizer.model").is_file():
        out.append(Tokenizer(STORIES / "tokenizer.model"))
    return out


def stream(tok: Tokenizer, ids: list[int], context: list[int] | None = None) -> list[str]:
    decoder = StreamDecoder(tok, context or [])
    return [decoder.push(i) for i in ids] + [decoder.finish()]


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


def test_stream_equals_final_decode_without_replacement_chars(tiny: Tokenizer) -> None:
    for tok in tokenizers(tiny):
        for text in TEXTS:
            ids = tok.encode(text)
            pieces = stream(tok, ids)
            assert "".join(pieces) == tok.decode(ids), (tok, text)
            assert not any("\ufffd" in p for p in pieces), (tok, text, pieces)
            if "🎉" in text or "日本" in text:
                assert len([p for p in pieces if p]) > 3  # really streamed, not one final blob


def test_stream_holds_back_incomplete_character(tiny: Tokenizer) -> None:
    ids = tiny.encode("a🦙")
    decoder = StreamDecoder(tiny)
    out = [decoder.push(i) for i in ids]
    assert out[-4:-1] == ["", "", ""]  # three bytes of the llama: nothing printable yet
    assert out[-1] == "🦙"
    assert decoder.finish() == ""


def test_stream_keeps_leading_spaces_like_decode(llama2: Tokenizer) -> None:
    ids = llama2.encode("Hello world, how are you?")
    pieces = [p for p in stream(llama2, ids) if p]
    assert pieces[:2] == ["Hello", " world"]
    # A lone "▁" piece decodes to "" at the start of text but to " " before a character.
    ids = [29871, *llama2.encode("日")[1:], 29871, 29871]
    assert "".join(stream(llama2, ids)) == llama2.decode(ids)


def test_stream_continues_a_context(llama2: Tokenizer) -> None:
    prompt = llama2.encode("Once upon a", bos=True)
    completion = llama2.encode("Once upon a time 🦙 there", bos=True)[len(prompt) :]
    full = llama2.decode(prompt + completion)
    assert "".join(stream(llama2, completion, prompt)) == full[len(llama2.decode(prompt)) :]
    assert "".join(stream(llama2, completion, prompt)).startswith(" time")


def test_stream_random_ids_property(tiny: Tokenizer) -> None:
    """Arbitrary id sequences, half raw bytes (invalid UTF-8 included): stream == decode."""
    rng = random.Random(1234)
    for tok in tokenizers(tiny):
        byte_ids = [i for i in range(tok.vocab_size) if tok.sp.is_byte(i)]
        for _ in range(400):
            ids = [
                rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(tok.vocab_size)
                for _ in range(rng.randint(1, 16))
            ]
            pieces = stream(tok, ids)
            assert "".join(pieces) == tok.decode(ids), ids
            # U+FFFD is only released once text follows it, i.e. it is final output, never held bytes.
            for piece in pieces[:-1]:
                assert not piece.endswith("\ufffd"), (ids, pieces)


def test_invalid_bytes_are_final_replacement(tiny: Tokenizer) -> None:
    lone = tiny.sp.piece_to_id("<0xF0>")
    ids = [lone, *tiny.encode("ok")]
    assert "".join(stream(tiny, ids)) == tiny.decode(ids)
    assert tiny.decode(ids).startswith("\ufffd")


def test_missing_and_bad_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer file not found"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer(bad)


def test_vocab_mismatch_is_refused(tiny: Tokenizer) -> None:
    tiny.check_model_vocab(tiny.vocab_size, "m")
    with pytest.raises(TokenizerError, match=r"320 pieces but model m has a vocabulary of 512"):
        tiny.check_model_vocab(512, "m")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tiny.check_ids([1, 320])
