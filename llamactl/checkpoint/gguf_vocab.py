"""SentencePiece vocabularies in and out of GGUF (`tokenizer.ggml.model = "llama"`).

Writing: the pieces, scores and token types of a `tokenizer.model`, typed exactly as
llama.cpp's convert_hf_to_gguf.py types them (normal / unknown / control / unused / byte),
padded with `[PAD{i}]` up to the model's vocabulary, plus BOS/EOS/UNK ids and the
normalizer flags.

Reading: until the tokenizer package reads GGUF vocabularies itself, `spm_model_bytes`
rebuilds a SentencePiece model from a GGUF's llama vocabulary (pieces, scores, types, BPE
with byte fallback, the normalizer flags), so `generate`, `chat` and `tokenize` run on a
bare .gguf with the sentencepiece tokenizer they already use. The protobuf is encoded by
hand: only the dozen fields below are needed, and `protobuf` is not a core dependency.
Field numbers are sentencepiece_model.proto's (a test checks them with its generated module).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llamactl import jsonio
from llamactl.errors import CheckpointError, printable

if TYPE_CHECKING:
    from llamactl.checkpoint.gguf_file import GGUFFile

# GGUF token types (gguf.TokenType) == SentencePiece piece types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class SpmVocab:
    """What a GGUF llama vocabulary holds."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None = None
    add_space_prefix: bool = True
    remove_extra_whitespaces: bool = False
    charsmap: bytes | None = None  # the normalizer's precompiled_charsmap (NFKC rules), if any


# ----------------------------------------------------------------------------- from tokenizer.model


def read_tokenizer_model(path: Path, n_vocab: int) -> SpmVocab:
    """The vocabulary of a SentencePiece file, padded to the model's `n_vocab` as llama.cpp pads it."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a SentencePiece model ({str(exc).splitlines()[0]})") from None
    size = sp.vocab_size()
    if size > n_vocab:
        raise CheckpointError(f"{path}: the tokenizer has {size} pieces but the model's vocabulary is {n_vocab}")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores, types = [-10000.0] * n_vocab, [UNUSED] * n_vocab
    for i in range(size):
        tokens[i], scores[i], types[i] = sp.id_to_piece(i), sp.get_score(i), _piece_type(sp, i)
    normalizer = _normalizer_spec(sp.serialized_model_proto())

    def known(token_id: int) -> int | None:
        return token_id if 0 <= token_id < size else None

    return SpmVocab(
        tokens,
        scores,
        types,
        known(sp.bos_id()),
        known(sp.eos_id()),
        known(sp.unk_id()),
        known(sp.pad_id()),
        add_space_prefix=bool(normalizer.get(3, True)),
        remove_extra_whitespaces=bool(normalizer.get(4, True)),
        charsmap=normalizer.get(2) or None,  # type: ignore[arg-type]
    )


def _piece_type(sp: object, i: int) -> int:
    """convert_hf_to_gguf's order of tests: unknown, control, unused, byte, else normal."""
    for test, kind in (("is_unknown", UNKNOWN), ("is_control", CONTROL), ("is_unused", UNUSED), ("is_byte", BYTE)):
        if getattr(sp, test)(i):
            return kind
    return NORMAL


def _special_id_kvs(
    bos: int | None, eos: int | None, unk: int | None, pad: int | None
) -> dict[str, tuple[object, str]]:
    """The special-token id KVs both vocabulary kinds carry (only those the vocabulary has)."""
    ids = {"bos_token_id": bos, "eos_token_id": eos, "unknown_token_id": unk, "padding_token_id": pad}
    return {f"tokenizer.ggml.{key}": (value, "UINT32") for key, value in ids.items() if value is not None}


def gguf_kvs(vocab: SpmVocab) -> dict[str, tuple[object, str]]:
    """GGUF KVs for a llama vocabulary: key -> (value, GGUFValueType name, or 'ARRAY:<item type>')."""
    kvs: dict[str, tuple[object, str]] = {
        "tokenizer.ggml.model": ("llama", "STRING"),
        "tokenizer.ggml.pre": ("default", "STRING"),
        "tokenizer.ggml.tokens": (vocab.tokens, "ARRAY:STRING"),
        "tokenizer.ggml.scores": (vocab.scores, "ARRAY:FLOAT32"),
        "tokenizer.ggml.token_type": (vocab.types, "ARRAY:INT32"),
    }
    kvs.update(_special_id_kvs(vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id))
    kvs["tokenizer.ggml.add_bos_token"] = (True, "BOOL")
    kvs["tokenizer.ggml.add_eos_token"] = (False, "BOOL")
    kvs["tokenizer.ggml.add_space_prefix"] = (vocab.add_space_prefix, "BOOL")
    kvs["tokenizer.ggml.remove_extra_whitespaces"] = (vocab.remove_extra_whitespaces, "BOOL")
    if vocab.charsmap:
        kvs["tokenizer.ggml.precompiled_charsmap"] = (vocab.charsmap, "ARRAY:UINT8")
    return kvs


# ----------------------------------------------------------------------------- from a GGUF


def vocab_from_gguf(file: GGUFFile) -> SpmVocab | None:
    """The llama (SentencePiece) vocabulary a GGUF carries; None for other kinds or none."""
    if file.get("tokenizer.ggml.model") != "llama":
        return None
    tokens = file.array("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{file.path}: tokenizer.ggml.model is 'llama' but tokenizer.ggml.tokens is missing")
    scores = file.array("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = file.array("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise CheckpointError(
            f"{file.path}: tokenizer.ggml.tokens, scores and token_type differ in length "
            f"({len(tokens)}, {len(scores)}, {len(types)})"
        )

    def token_id(key: str) -> int | None:
        value = file.get(f"tokenizer.ggml.{key}")
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(tokens) else None

    return SpmVocab(
        [str(t) for t in tokens],
        [float(s) for s in scores],
        [int(t) for t in types],
        token_id("bos_token_id"),
        token_id("eos_token_id"),
        token_id("unknown_token_id"),
        token_id("padding_token_id"),
        add_space_prefix=bool(file.get("tokenizer.ggml.add_space_prefix", True)),
        remove_extra_whitespaces=bool(file.get("tokenizer.ggml.remove_extra_whitespaces", False)),
        charsmap=bytes(file.array("tokenizer.ggml.precompiled_charsmap") or b"") or None,
    )


def spm_model_bytes(vocab: SpmVocab, where: str) -> bytes:
    """A serialized SentencePiece ModelProto (BPE) for `vocab`."""
    types = [t if t in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL for t in vocab.types]
    if vocab.unk_id is not None:
        types[vocab.unk_id] = UNKNOWN
    if types.count(UNKNOWN) != 1:
        raise CheckpointError(
            f"{where}: the vocabulary has {types.count(UNKNOWN)} unknown tokens (SentencePiece needs 1)"
        )
    if len(set(vocab.tokens)) != len(vocab.tokens):
        dup = next(t for i, t in enumerate(vocab.tokens) if t in vocab.tokens[:i])
        raise CheckpointError(f"{where}: token {printable(dup)[:40]!r} appears twice in the vocabulary")
    unk = types.index(UNKNOWN)
    pieces = b"".join(
        _field(1, _string(1, p) + _fixed32(2, s) + _varint_field(3, t))
        for p, s, t in zip(vocab.tokens, vocab.scores, types)
    )
    trainer = _varint_field(3, 2) + _varint_field(4, len(vocab.tokens))  # model_type BPE, vocab_size
    trainer += _varint_field(35, int(BYTE in types))  # byte_fallback
    ids = {40: unk, 41: vocab.bos_id, 42: vocab.eos_id, 43: vocab.pad_id}  # unk/bos/eos/pad _id
    names = {45: unk, 46: vocab.bos_id, 47: vocab.eos_id, 48: vocab.pad_id}  # ... _piece
    trainer += b"".join(_varint_field(f, -1 if i is None else i) for f, i in ids.items())
    trainer += b"".join(_string(f, vocab.tokens[i]) for f, i in names.items() if i is not None)
    normalizer = _string(1, "nmt_nfkc" if vocab.charsmap else "identity")
    normalizer += _field(2, vocab.charsmap) if vocab.charsmap else b""
    normalizer += _varint_field(3, int(vocab.add_space_prefix))
    normalizer += _varint_field(4, int(vocab.remove_extra_whitespaces)) + _varint_field(5, 1)
    return pieces + _field(2, trainer) + _field(3, normalizer)


# ----------------------------------------------------------------------------- protobuf wire format


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 values are sign-extended to 10 bytes
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _fixed32(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or sub-message)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _string(number: int, text: str) -> bytes:
    return _field(number, text.encode("utf-8"))


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of a serialized message (varint and length-delimited only)."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 2:
            length = varint()
            yield number, wire, data[pos : pos + length]
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            return


def _normalizer_spec(model: bytes) -> dict[int, int | bytes]:
    """NormalizerSpec's fields as set: 2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces."""
    try:
        for number, wire, value in _fields(model):
            if number == 3 and wire == 2 and isinstance(value, bytes):
                return {n: v for n, _, v in _fields(value) if n in (2, 3, 4)}
    except IndexError:
        pass  # a model sentencepiece itself loaded: unreachable in practice; defaults apply
    return {}


# ----------------------------------------------------------------------------- gpt2 (byte-level BPE)


@dataclass
class BpeVocab:
    """What a GGUF `gpt2` vocabulary holds (tokens are spelled in GPT-2's byte alphabet)."""

    tokens: list[str]
    merges: list[str]
    types: list[int]
    pre: str | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool


def bpe_vocab_from_gguf(file: GGUFFile) -> BpeVocab | None:
    """The `gpt2` (byte-level BPE) vocabulary a GGUF carries; None for other kinds or none."""
    if file.get("tokenizer.ggml.model") != "gpt2":
        return None
    tokens = file.array("tokenizer.ggml.tokens")
    merges = file.array("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise CheckpointError(f"{file.path}: tokenizer.ggml.model is 'gpt2' but its tokens or merges are missing")
    types = file.array("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(
            f"{file.path}: tokenizer.ggml.tokens and token_type differ in length ({len(tokens)}, {len(types)})"
        )

    def token_id(key: str) -> int | None:
        value = file.get(f"tokenizer.ggml.{key}")
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(tokens) else None

    pre = file.get("tokenizer.ggml.pre")
    return BpeVocab(
        [str(t) for t in tokens],
        [str(m) for m in merges],
        [int(t) for t in types],
        pre if isinstance(pre, str) else None,
        token_id("bos_token_id"),
        token_id("eos_token_id"),
        token_id("unknown_token_id"),
        token_id("padding_token_id"),
        add_bos=file.get("tokenizer.ggml.add_bos_token") is True,  # llama.cpp's default for gpt2: no BOS
        add_eos=file.get("tokenizer.ggml.add_eos_token") is True,
    )


def read_tokenizer_json(path: Path, n_vocab: int) -> BpeVocab:
    """A byte-level BPE tokenizer.json (with its tokenizer_config.json) as a GGUF `gpt2` vocabulary.

    Tokens by id (the model's vocabulary, then added tokens), padded to the model's `n_vocab`
    with `[PAD{i}]` as llama.cpp pads; added special tokens are CONTROL, other added ones
    USER_DEFINED, as convert_hf_to_gguf.py types them. `pre` is `llama-bpe` for Llama 3's split
    regex, else `gpt2` (GPT-2's own regex, what a bare ByteLevel pre-tokenizer applies).
    """
    import json

    from llamactl.tokenizer.hf import read_tokenizer_config

    try:
        data = jsonio.loads(path.read_text(encoding="utf-8"))
        model, added = data["model"], data.get("added_tokens") or []
        vocab, merges = dict(model["vocab"]), list(model.get("merges") or [])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({exc})") from None
    pre = json.dumps(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise CheckpointError(
            f"{path}: only a byte-level BPE tokenizer.json can be written to GGUF (this one is "
            f"{model.get('type')!r} without ByteLevel); convert from a checkpoint with a tokenizer.model instead"
        )
    size = max([*vocab.values(), *(int(t["id"]) for t in added)], default=-1) + 1
    if size > n_vocab:
        raise CheckpointError(f"{path}: the tokenizer has {size} tokens but the model's vocabulary is {n_vocab}")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [NORMAL] * size + [UNUSED] * (n_vocab - size)
    for token, token_id in vocab.items():
        tokens[token_id] = token
    for token in added:
        tokens[int(token["id"])] = str(token["content"])
        types[int(token["id"])] = CONTROL if token.get("special") else USER_DEFINED
    config = read_tokenizer_config(path.parent)
    index = {t: i for i, t in enumerate(tokens)}

    def token_id(token: str | None) -> int | None:
        return index.get(token) if token is not None else None

    return BpeVocab(
        tokens,
        [m if isinstance(m, str) else " ".join(m) for m in merges],
        types,
        "llama-bpe" if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pre else "gpt2",
        token_id(config.bos_token),
        token_id(config.eos_token),
        token_id(config.unk_token),
        token_id(config.pad_token),
        add_bos=bool(config.add_bos_token),
        add_eos=bool(config.add_eos_token),
    )


def bpe_gguf_kvs(vocab: BpeVocab) -> dict[str, tuple[object, str]]:
    """GGUF KVs for a `gpt2` vocabulary, in convert_hf_to_gguf.py's order."""
    kvs: dict[str, tuple[object, str]] = {
        "tokenizer.ggml.model": ("gpt2", "STRING"),
        "tokenizer.ggml.pre": (vocab.pre or "gpt2", "STRING"),
        "tokenizer.ggml.tokens": (vocab.tokens, "ARRAY:STRING"),
        "tokenizer.ggml.token_type": (vocab.types, "ARRAY:INT32"),
        "tokenizer.ggml.merges": (vocab.merges, "ARRAY:STRING"),
    }
    kvs.update(_special_id_kvs(vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id))
    kvs["tokenizer.ggml.add_bos_token"] = (vocab.add_bos, "BOOL")
    kvs["tokenizer.ggml.add_space_prefix"] = (False, "BOOL")
    return kvs
