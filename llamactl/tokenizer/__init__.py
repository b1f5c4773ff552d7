"""One tokenizer interface for every vocabulary llamactl reads, and the exact stream decoder.

SentencePiece reads Llama 1/2's tokenizer.model (`sentencepiece.py`, exact with Meta); the
`tokenizers` library reads tokenizer.json, byte-level and SentencePiece-style BPE alike
(`hf.py`); a GGUF's own vocabulary is one of the two (`bpe.py` builds a `gpt2` one).
`StreamDecoder` (`stream.py`) turns ids into text as they are generated, exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from llamactl.errors import TokenizerError
from llamactl.tokenizer.hf import JSON_FILE, HFTokenizer
from llamactl.tokenizer.sentencepiece import SentencePieceTokenizer
from llamactl.tokenizer.stream import StreamDecoder


@runtime_checkable
class Tokenizer(Protocol):
    """What llamactl needs of a tokenizer. BOS/EOS are ids, never text."""

    bos_id: int
    eos_id: int
    vocab_size: int
    add_bos: bool  # whether a plain text starts with BOS (Llama: yes; GPT-2-style BPE: usually not)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text`, optionally framed by the BOS / EOS ids."""
        ...

    def encode_chat(self, text: str) -> list[int]:
        """Ids of a rendered chat template: special-token strings in it are those tokens; no BOS added."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` as the start of a text (control ids vanish)."""
        ...

    def decode_continuation(self, ids: Sequence[int]) -> str:
        """Text of `ids` continuing earlier text (a leading space stays)."""
        ...

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of one id, as stored (`▁the`, `<0xF0>`)."""
        ...

    def check_ids(self, ids: Iterable[int], source: str = "token ids") -> list[int]:
        """`ids` as ints; TokenizerError naming `source` for one outside the vocabulary."""
        ...


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer stored in `path`: a tokenizer.json (or a directory holding one) through
    `tokenizers`, anything else as a SentencePiece model."""
    path = Path(path)
    if path.is_dir() and (path / JSON_FILE).is_file():
        path = path / JSON_FILE
    if path.suffix.lower() == ".json":
        return HFTokenizer.from_file(path)
    return SentencePieceTokenizer(path)


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids generation stops at: EOS, plus an end-of-turn token where the tokenizer names one
    (`stop_ids`, optional: a plugin's tokenizer without it stops at EOS alone)."""
    return list(getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_id])


def check_model_vocab(tokenizer: Tokenizer, model_vocab: int, model_name: str, source: str | Path) -> None:
    """Refuse a tokenizer (read from `source`) whose vocabulary contradicts the model's embedding."""
    if model_vocab != tokenizer.vocab_size:
        raise TokenizerError(
            f"{source}: tokenizer has {tokenizer.vocab_size} pieces but model {model_name} has a "
            f"vocabulary of {model_vocab}; use the tokenizer.model that came with the model"
        )


class MissingTokenizerError(TokenizerError):
    """A checkpoint has no tokenizer file and none was given."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        super().__init__(
            f"{model_path}: no tokenizer.model or tokenizer.json next to the weights; give a tokenizer file"
        )


def open_tokenizer(
    tokenizer_path: str | Path | None, checkpoint_tokenizer: Path | None, model_path: Path, model_vocab: int
) -> Tokenizer:
    """The tokenizer to run a model with: an explicit file, else the checkpoint's tokenizer.model.

    Its vocabulary must match the model's embedding, or every id would mean something else.
    """
    path = tokenizer_path if tokenizer_path is not None else checkpoint_tokenizer
    if path is None:
        raise MissingTokenizerError(model_path)
    tokenizer = load_tokenizer(path)
    check_model_vocab(tokenizer, model_vocab, str(model_path), path)
    return tokenizer


__all__ = [
    "HFTokenizer",
    "MissingTokenizerError",
    "SentencePieceTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "check_model_vocab",
    "load_tokenizer",
    "open_tokenizer",
    "stop_ids",
]
