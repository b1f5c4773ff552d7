"""The streaming detokenizer: what it releases always equals the final decode."""

from __future__ import annotations

import random

from llamactl.tokenizer import StreamDecoder, Tokenizer
from tests.tokenizer._util import TEXTS, tokenizers


def stream(tok: Tokenizer, ids: list[int], context: list[int] | None = None) -> list[str]:
    decoder = StreamDecoder(tok, context or [])
    return [decoder.push(i) for i in ids] + [decoder.finish()]


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
