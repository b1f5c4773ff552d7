"""SentencePiece vocabularies (Llama 1/2's tokenizer.model) behind the Tokenizer protocol.

Llama 1/2 use a SentencePiece BPE model with byte fallback: a leading space is part of a
piece (`▁the`), the first piece of a text loses it on decode, and a character missing from
the vocabulary is spelled as its UTF-8 bytes (`<0xF0>` `<0x9F>` ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from llamactl.errors import TokenizerError, utf8_text

_REPLACEMENT = "\ufffd"


class SentencePieceTokenizer:
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
        self.add_bos = True  # Llama's rule: a text starts with BOS
        self.stop_ids = [self.eos_id]
        self.bos_token = self.sp.id_to_piece(self.bos_id) if self.bos_id >= 0 else None
        self.eos_token = self.sp.id_to_piece(self.eos_id) if self.eos_id >= 0 else None
        self.chat_template: str | None = None
        self._control = {self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i)}
        self.special_tokens: frozenset[str] = frozenset(self._control)  # what encode_chat reads as control ids
        self._split = re.compile("|".join(map(re.escape, sorted(self._control, key=len, reverse=True))))
        self._sentinel = self._find_sentinel()

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids: list[int] = self.sp.encode(utf8_text(text, "text"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_chat(self, text: str) -> list[int]:
        """Ids of a rendered chat template: control pieces written in it (`<s>`, `</s>`) are
        those tokens, the text between them is encoded as SentencePiece encodes a text."""
        ids: list[int] = []
        position = 0
        for match in self._split.finditer(text) if self._control else ():
            if match.start() > position:
                ids += self.sp.encode(text[position : match.start()])
            ids.append(self._control[match.group()])
            position = match.end()
        if position < len(text):
            ids += self.sp.encode(text[position:])
        return ids

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
