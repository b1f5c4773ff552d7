"""The exact streaming detokenizer.

Decoding token by token prints garbage: a character can span several byte tokens, and a
piece's leading space depends on what precedes it. `StreamDecoder` only ever releases text
that the final decode of all tokens will contain.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"


class _Decodes(Protocol):
    """The part of the Tokenizer protocol streaming needs."""

    def decode(self, ids: Iterable[int]) -> str: ...

    def decode_continuation(self, ids: Sequence[int]) -> str: ...


class StreamDecoder:
    """Turns tokens into text as they come, exactly as the final decode would print them.

    `push(id)` returns newly complete text (maybe ""), `finish()` the rest. Invariant:
    the concatenation of all returned strings equals `tokenizer.decode(ids)` (or, with
    `context`, the continuation of the context's text). A trailing U+FFFD is held back
    because the next byte token may complete the character; it is only released when
    text follows it (then it is really in the output) or at `finish()`.
    Work per token is constant: only a short window of ids is decoded each time.
    """

    def __init__(self, tokenizer: _Decodes, context: Sequence[int] = (), context_window: int = 6) -> None:
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
