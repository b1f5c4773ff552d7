"""tokenizer.json and GGUF byte-level vocabularies through `tokenizers`, against transformers' AutoTokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamactl.checkpoint import open_checkpoint
from llamactl.errors import TokenizerError
from llamactl.tokenizer import HFTokenizer, StreamDecoder, load_tokenizer
from tests._ckpt import random_meta_state, tiny_args
from tests._gguf import write_reference_gguf
from tests._hf_tokenizers import SPECIALS, byte_level_dir, sentencepiece_dir
from tests.tokenizer._util import TEXTS

EXTRA = [
    "<|im_start|>user\nhi<|im_end|>",
    "   three leading spaces",
    "1 22 333 4444 55555",
    "tab\tand\r\nwindows line",
    "🦙🦙 llamas 🦙 and 😀😀😀",
]


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return byte_level_dir(tmp_path_factory.mktemp("bl"))


def test_byte_level_tokenizer_json_equals_autotokenizer(byte_level: Path) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(byte_level))
    tok = load_tokenizer(byte_level / "tokenizer.json")
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id) == (1, 2) and not tok.add_bos
    assert tok.vocab_size == len(ref)
    for text in TEXTS + EXTRA:
        ids = tok.encode(text, bos=tok.add_bos)
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert tok.encode("<|im_start|>")[0] == 1  # a special token's text is that token, as transformers reads it
    assert tok.encode("hi", bos=True, eos=True)[:: len(tok.encode("hi")) + 1] == [1, 2]


def test_stream_decoding_byte_level_is_exact(byte_level: Path) -> None:
    """Characters split over several byte tokens never show as U+FFFD mid-stream."""
    tok = load_tokenizer(byte_level / "tokenizer.json")
    split = 0
    for text in TEXTS + EXTRA[1:]:
        ids = tok.encode(text)
        split += sum("\ufffd" in tok.decode([i]) for i in ids)
        pieces = list(StreamDecoder(tok).stream(ids))
        assert "".join(pieces) == tok.decode(ids) == text, text
        assert all("\ufffd" not in piece for piece in pieces), pieces
        context = tok.encode("Prefix: ")
        cont = list(StreamDecoder(tok, context=context).stream(ids))
        assert "".join(cont) == tok.decode_continuation(ids) == text
    assert split > 10  # the small vocabulary really cuts emoji and CJK into byte tokens


def test_sentencepiece_style_tokenizer_json_equals_autotokenizer(tmp_path: Path, llama2_tokenizer: Path) -> None:
    """transformers' own tokenizer.json of Llama 2's tokenizer.model: same ids as AutoTokenizer and
    as SentencePiece itself; decoding (Metaspace drops the first space) matches too."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    directory = sentencepiece_dir(llama2_tokenizer, tmp_path / "llama2-json")
    ref = AutoTokenizer.from_pretrained(str(directory))
    tok = load_tokenizer(directory)
    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer))
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 32000)
    for text in TEXTS + EXTRA[1:]:
        ids = tok.encode(text, bos=tok.add_bos)
        assert ids == ref(text)["input_ids"], text
        # transformers' conversion itself differs from SentencePiece on runs of spaces and a
        # leading space (a tokenizer.model is read with SentencePiece for that reason).
        if "  " not in text and "\t" not in text and "\r" not in text and not text.startswith(" "):
            assert ids == [1, *sp.encode(text)], text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        pieces = list(StreamDecoder(tok).stream(ids[1:]))
        assert "".join(pieces) == tok.decode(ids[1:]) and all("\ufffd" not in p for p in pieces)


def gpt2_kvs(directory: Path) -> dict[str, object]:
    """A GGUF `gpt2` vocabulary made from a tokenizer.json the way convert_hf_to_gguf.py makes it."""
    data = json.loads((directory / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


@pytest.mark.slow  # transformers' GGUF tokenizer builder: ~6 s
def test_gguf_gpt2_vocabulary_equals_transformers_gguf_tokenizer(tmp_path: Path, byte_level: Path) -> None:
    """A GGUF's byte-level vocabulary becomes a tokenizer giving transformers' GGUF loader's ids."""
    from transformers import AutoTokenizer

    args = tiny_args(vocab_size=400)
    extra = gpt2_kvs(byte_level)
    path = write_reference_gguf(tmp_path / "bpe.gguf", args, random_meta_state(args), extra=extra)
    reader = open_checkpoint(path)
    assert reader.tokenizer_path is not None and reader.tokenizer_path.name == "tokenizer.json"
    tok = load_tokenizer(reader.tokenizer_path)
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    mine = load_tokenizer(byte_level / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    for text in TEXTS + EXTRA:
        ids = tok.encode(text, bos=tok.add_bos)
        assert ids == ref(text)["input_ids"] == mine.encode(text), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert open_checkpoint(path).tokenizer_path == reader.tokenizer_path  # cached, not rebuilt


def test_a_checkpoint_with_only_tokenizer_json_uses_it(tmp_path: Path, byte_level: Path) -> None:
    from llamactl.checkpoint.base import ReaderBase

    reader = ReaderBase(path=byte_level, args=tiny_args(), files=[])
    assert reader.tokenizer_path == byte_level / "tokenizer.json"
    assert reader.chat_template is not None and "<|im_start|>" in reader.chat_template


def test_bad_tokenizer_json_is_one_error_naming_the_file(tmp_path: Path, byte_level: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a tokenizer\.json"):
        load_tokenizer(bad)
    bad.write_bytes((byte_level / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not readable JSON"):
        load_tokenizer(bad)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<nope>"}')
    with pytest.raises(TokenizerError, match=r"bos_token '<nope>' is not in the vocabulary"):
        load_tokenizer(bad)


def test_stories260k_gguf_tokenizer_ids_equal_transformers(tmp_path: Path, stories_dir: Path) -> None:
    """stories260K -> GGUF: the vocabulary read back gives transformers' GGUF tokenizer's ids, and
    SentencePiece's own. transformers alone drops one leading space of a text (its Llama tokenizer
    conversion does so for the tokenizer.model too); there SentencePiece is the reference."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from tests.cli._run import run_cli

    out = tmp_path / "stories.gguf"
    assert run_cli("convert", str(stories_dir), str(out), "--to", "gguf").exit_code == 0
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    sp = spm.SentencePieceProcessor(model_file=str(stories_dir / "tokenizer.model"))
    tok = load_tokenizer(open_checkpoint(out).tokenizer_path)  # type: ignore[arg-type]
    cli = run_cli("tokenize", "--model", str(out), "--json", TEXTS[1])
    assert json.loads(cli.stdout) == tok.encode(TEXTS[1], bos=True) == ref(TEXTS[1])["input_ids"]
    for text in TEXTS + EXTRA[1:]:
        ids = tok.encode(text, bos=tok.add_bos)
        assert ids == [1, *sp.encode(text)], text
        if not text.startswith(" "):
            assert ids == ref(text)["input_ids"], text
        else:
            assert ids[1] == sp.piece_to_id("▁") and ids[2:] == ref(text)["input_ids"][1:], text


def test_generation_stops_at_the_end_of_turn_ids_generation_config_lists(tmp_path: Path, byte_level: Path) -> None:
    """transformers' generate stops at every generation_config.json eos_token_id: so does llamactl."""
    from llamactl.tokenizer import stop_ids

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((byte_level / name).read_bytes())
    assert stop_ids(load_tokenizer(tmp_path / "tokenizer.json")) == [2]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 0]}')
    assert stop_ids(load_tokenizer(tmp_path / "tokenizer.json")) == [2, 0]


def test_gguf_end_of_turn_token_stops_generation(tmp_path: Path, byte_level: Path) -> None:
    from llamactl.tokenizer import stop_ids

    args = tiny_args(vocab_size=400)
    extra = gpt2_kvs(byte_level) | {"tokenizer.ggml.eot_token_id": 0}
    path = write_reference_gguf(tmp_path / "eot.gguf", args, random_meta_state(args), extra=extra)
    tok = load_tokenizer(open_checkpoint(path).tokenizer_path)  # type: ignore[arg-type]
    assert stop_ids(tok) == [2, 0]
