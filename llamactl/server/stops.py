"""OpenAI's `stop` sequences over streamed text: the answer ends before the first one, which is never sent.

Text arrives in pieces, and a stop sequence may straddle two of them, so a tail that could
still begin a stop sequence is held back until the next piece decides it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopScanner:
    """Feed streamed text; get what may be sent now and whether a stop sequence was reached.

    Invariant: the concatenation of everything returned (by `feed` and `flush`) is the full
    text cut just before the earliest stop sequence (the whole text when none occurs).
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.hit: str | None = None  # the stop sequence that ended the text

    def feed(self, piece: str) -> str:
        """The text that is safe to send after `piece` ("" once a stop sequence was reached)."""
        if self.hit is not None:
            return ""
        text = self._held + piece
        found = [(text.find(s), s) for s in self.stops if s in text]
        if found:
            at, self.hit = min(found)
            self._held = ""
            return text[:at]
        keep = self._unsafe_tail(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held-back tail once the text ended without a stop sequence."""
        held, self._held = self._held, ""
        return "" if self.hit is not None else held

    def _unsafe_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop sequence."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
