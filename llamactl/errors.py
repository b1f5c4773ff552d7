"""Errors the library raises for bad input.

Every message names the file or value at fault and what was expected, so the CLI can print
it as one line. `assert` is kept for internal invariants only.
"""

from __future__ import annotations

INTERRUPTED = 130  # exit code after Ctrl-C (README: exit codes)
TERMINATED = 143  # exit code after SIGTERM (128 + 15, as shells report it)


class LlamactlError(Exception):
    """Base class: a user-facing error whose message is one complete sentence."""

    exit_code = 1


class UsageError(LlamactlError):
    """The command line itself is wrong (exit code 2, like argument parsing errors)."""

    exit_code = 2


class ConfigError(LlamactlError):
    """params.json / config.json is missing, malformed or not a Llama."""


class CheckpointError(LlamactlError):
    """A weights file is unreadable, truncated, unsafe or contradicts its config."""


class ModelNotFoundError(LlamactlError):
    """A model name or path resolves to nothing."""


class DestinationError(LlamactlError):
    """An output path exists, overlaps the input or cannot be written."""


class MissingDependencyError(LlamactlError):
    """An optional dependency is not installed; the message carries the install hint."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill`, `timeout` and systemd send): unwinds like Ctrl-C, so every cleanup runs."""


class TokenizerError(LlamactlError):
    """A tokenizer file is missing, unreadable or does not fit the model."""


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {c: f"\\x{c:02x}" for c in range(0x80, 0xA0)}


def printable(text: str) -> str:
    """`text` with control characters escaped, for messages that quote file content.

    A tensor name or config value holding terminal escapes (OSC, CSI) must never reach the
    user's terminal raw.
    """
    return text.translate(_CONTROL)


def utf8_text(text: str, where: str) -> str:
    """`text` unchanged if it is valid Unicode; else TokenizerError naming `where` and the bad spot.

    Text from a byte stream decoded with surrogateescape (stdin, argv) keeps each invalid byte
    as a lone surrogate U+DC80..U+DCFF; a JSON "\\ud800" escape gives one too. Tokenizers
    (SentencePiece's C++) cannot take either.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise TokenizerError(f"{where}: not valid UTF-8 text ({bad} at character {exc.start})") from None
    return text
