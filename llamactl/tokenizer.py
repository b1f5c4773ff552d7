"""A thin SentencePiece wrapper and an exact streaming detokenizer.

Llama 1/2 use a SentencePiece BPE model with byte fallback: a leading space is part of a
piece (`▁the`), the first piece of a text loses it on decode, and a character missing from
the vocabulary is spelled as its UTF-8 bytes (`<0xF0>` `<0x9F>` ...). Decoding token by
token therefore prints garbage; `StreamDecoder` only ever releases text that the final
decode of all tokens will contain.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from llamactl.errors import LlamactlError

_REPLACEMENT = "\ufffd"


class TokenizerError(LlamactlError):
    """A tokenizer file is missing, unreadable or does not fit the model."""


class Tokenizer:
    """SentencePiece model with Llama's BOS/EOS conventions (BOS/EOS are ids, never text)."""

    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: tokenizer file not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({str(exc).splitlines()[0]})") from None
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self._sentinel = self._find_sentinel()

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids: list[int] = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Decode as SentencePiece does (control ids such as BOS/EOS vanish)."""
        return self.sp.decode([int(i) for i in ids])

    def decode_continuation(self, ids: Sequence[int]) -> str:
        """Decode `ids` as text that continues earlier text (a leading `▁` stays a space)."""
        sentinel_text = self.sp.decode([self._sentinel])
        text = self.sp.decode([self._sentinel, *ids])
        return text[len(sentinel_text) :]

    def piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    def check_ids(self, ids: Iterable[int], source: str = "token ids") -> list[int]:
        """Return ids as ints, raising TokenizerError for one outside the vocabulary."""
        out = [int(i) for i in ids]
        for i in out:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"{source}: id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return out

    def check_model_vocab(self, model_vocab: int, model_name: str) -> None:
        """Refuse a tokenizer whose vocabulary contradicts the model's embedding."""
        if model_vocab != self.vocab_size:
            raise TokenizerError(
                f"{self.path}: tokenizer has {self.vocab_size} pieces but model {model_name} has a "
                f"vocabulary of {model_vocab}; use the tokenizer.model that came with the model"
            )

    def _find_sentinel(self) -> int:
        # A plain piece decoding to visible text, prepended so that SentencePiece's
        # "drop the first piece's leading space" rule hits it instead of our tokens.
        for i in range(self.vocab_size):
            sp = self.sp
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
                continue
            text = sp.decode([i])
            if text.strip() and _REPLACEMENT not in text:
                return i
        raise TokenizerError(f"{self.path}: the vocabulary has no ordinary text piece")


def open_tokenizer(
    tokenizer_path: str | Path | None, checkpoint_tokenizer: Path | None, model_path: Path, model_vocab: int
) -> Tokenizer:
    """The tokenizer to run a model with: an explicit file, else the checkpoint's tokenizer.model.

    Its vocabulary must match the model's embedding, or every id would mean something else.
    """
    path = tokenizer_path if tokenizer_path is not None else checkpoint_tokenizer
    if path is None:
        raise TokenizerError(f"{model_path}: no tokenizer.model next to the weights; pass --tokenizer FILE")
    tokenizer = Tokenizer(path)
    tokenizer.check_model_vocab(model_vocab, str(model_path))
    return tokenizer


class StreamDecoder:
    """Turns tokens into text as they come, exactly as the final decode would print them.

    `push(id)` returns newly complete text (maybe ""), `finish()` the rest. Invariant:
    the concatenation of all returned strings equals `tokenizer.decode(ids)` (or, with
    `context`, the continuation of the context's text). A trailing U+FFFD is held back
    because the next byte token may complete the character; it is only released when
    text follows it (then it is really in the output) or at `finish()`.
    Work per token is constant: only a short window of ids is decoded each time.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = (), context_window: int = 6) -> None:
        self.tok = tokenizer
        tail = list(context[-context_window:])
        self._at_start = len(context) <= context_window  # window still begins at the text's start
        self.ids: list[int] = tail
        self._prefix = 0  # ids[_prefix:_read] were already turned into text
        self._read = len(tail)
        self.text = ""  # everything released so far

    def _decode(self, start: int, end: int | None = None) -> str:
        window = self.ids[start:end]
        if start == 0 and self._at_start:
            return self.tok.decode(window)
        return self.tok.decode_continuation(window)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self._prefix, self._read)
        new_text = self._decode(self._prefix)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        piece = new_text[_common_prefix(prefix_text, new_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece

    def finish(self) -> str:
        """Release whatever is held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self._prefix, self._read)
        new_text = self._decode(self._prefix)
        piece = new_text[_common_prefix(prefix_text, new_text) :]
        self._prefix = self._read = len(self.ids)
        self.text += piece
        return piece

    def stream(self, tokens: Iterable[int]) -> Iterator[str]:
        """Push every token, yielding each non-empty piece, then the held-back tail."""
        for token in tokens:
            piece = self.push(token)
            if piece:
                yield piece
        tail = self.finish()
        if tail:
            yield tail


def _common_prefix(old: str, new: str) -> int:
    """len(old) when new extends old (always, unless a context ends mid-character)."""
    if new.startswith(old):
        return len(old)
    n = 0
    while n < min(len(old), len(new)) and old[n] == new[n]:
        n += 1
    return n
