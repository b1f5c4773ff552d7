"""Hugging Face `tokenizers` vocabularies (tokenizer.json) behind the Tokenizer protocol.

Byte-level BPE (GPT-2 style: `Ġthe`, SmolLM2, Llama 3) and SentencePiece-style BPE
(Metaspace `▁the` with byte fallback, what transformers converts a tokenizer.model into) are
both a `tokenizers.Tokenizer`; this class only adds Llama's conventions: BOS/EOS are ids,
special-token strings in a text are read as those tokens (as transformers reads them), and
control tokens vanish from decoded text. Which special tokens are BOS/EOS and whether a
plain text gets a BOS come from `tokenizer_config.json` beside the file, as transformers
takes them; a GGUF vocabulary built into a tokenizer (`bpe.py`) comes with the same file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamactl import jsonio
from llamactl.errors import TokenizerError

JSON_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
GENERATION_FILE = "generation_config.json"
_REPLACEMENT = "\ufffd"


@dataclass
class TokenizerConfig:
    """What tokenizer_config.json says about special tokens (the parts llamactl uses)."""

    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    add_bos_token: bool | None = None  # None: as the tokenizer's own post-processor does
    add_eos_token: bool | None = None
    chat_template: str | None = None
    stop_ids: tuple[int, ...] = ()  # generation_config.json's eos_token_id(s)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def chat_template_from(config: dict[str, Any]) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or a list of named ones (the "default")."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def read_tokenizer_config(directory: Path) -> TokenizerConfig:
    """tokenizer_config.json (and chat_template.jinja, where transformers 5 keeps the template)."""
    path = directory / CONFIG_FILE
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = jsonio.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise TokenizerError(f"{path}: not readable JSON ({exc})") from None
        data = loaded if isinstance(loaded, dict) else {}
    template = chat_template_from(data)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")

    def flag(key: str) -> bool | None:
        return data[key] if isinstance(data.get(key), bool) else None

    return TokenizerConfig(
        _token_text(data.get("bos_token")),
        _token_text(data.get("eos_token")),
        _token_text(data.get("unk_token")),
        _token_text(data.get("pad_token")),
        flag("add_bos_token"),
        flag("add_eos_token"),
        template,
        _generation_stop_ids(directory),
    )


def _generation_stop_ids(directory: Path) -> tuple[int, ...]:
    """generation_config.json's eos_token_id (an int or a list); () when absent or unreadable."""
    try:
        data = jsonio.loads((directory / GENERATION_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return ()
    value = data.get("eos_token_id") if isinstance(data, dict) else None
    values = value if isinstance(value, list) else [value]
    return tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool))


class HFTokenizer:
    """A `tokenizers.Tokenizer` with Llama's BOS/EOS conventions (BOS/EOS are ids, never text)."""

    def __init__(self, backend: Any, config: TokenizerConfig, source: str | Path) -> None:
        self.backend = backend
        self.config = config
        self.path = Path(source)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.eos_token = config.bos_token, config.eos_token
        self.bos_id: int = self._id_of(config.bos_token, "bos_token")
        self.eos_id: int = self._id_of(config.eos_token, "eos_token")
        self.add_bos: bool = self._adds_bos() if config.add_bos_token is None else config.add_bos_token
        # Generation stops at EOS and at every eos_token_id generation_config.json lists (an
        # end-of-turn token such as Llama 3's <|eot_id|>), as transformers' generate stops.
        self.stop_ids: list[int] = [i for i in dict.fromkeys([self.eos_id, *config.stop_ids]) if i >= 0]
        self.chat_template = config.chat_template
        self._special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        self.special_tokens: frozenset[str] = frozenset(self._special)  # texts that encode as a special token
        self._sentinel = self._find_sentinel()

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """tokenizer.json, with tokenizer_config.json beside it (when there is one)."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file not found")
        try:
            backend = Backend.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
            raise TokenizerError(f"{path}: not a tokenizer.json ({str(exc).splitlines()[0][:200]})") from None
        return cls(backend, read_tokenizer_config(path.parent), path)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def _id_of(self, token: str | None, what: str) -> int:
        if token is None:
            return -1  # no such token: never produced, never a stop
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.path}: {what} {token!r} is not in the vocabulary")
        return int(token_id)

    def _adds_bos(self) -> bool:
        """Whether the tokenizer's post-processor puts BOS before a text (transformers' default)."""
        if self.bos_id < 0:
            return False
        return self.backend.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]

    # ------------------------------------------------------------------ Tokenizer protocol

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text`; special-token strings in it become their ids, as transformers reads them."""
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id >= 0 else []) + ids + ([self.eos_id] if eos else [])

    def encode_chat(self, text: str) -> list[int]:
        """Ids of a rendered chat template (it writes BOS itself when the model wants one)."""
        return self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens (BOS, EOS, `<|im_end|>`) vanish."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def decode_continuation(self, ids: Sequence[int]) -> str:
        """`ids` as text continuing earlier text: a decoder that drops the first leading space
        (Metaspace) meets a sentinel token instead of `ids`."""
        sentinel_text = self.decode([self._sentinel])
        return self.decode([self._sentinel, *ids])[len(sentinel_text) :]

    def piece(self, token_id: int) -> str:
        piece = self.backend.id_to_token(int(token_id))
        return piece if piece is not None else ""

    def check_ids(self, ids: Iterable[int], source: str = "token ids") -> list[int]:
        out = [int(i) for i in ids]
        for i in out:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"{source}: id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return out

    def _find_sentinel(self) -> int:
        for i in range(min(self.vocab_size, 1 << 16)):
            piece = self.backend.id_to_token(i)
            if piece is None or piece in self._special:
                continue
            text = self.decode([i])
            if text.isalnum() and self.decode([i, i]) == text + text:
                return i
        raise TokenizerError(f"{self.path}: the vocabulary has no ordinary text token")


def save_tokenizer_dir(directory: Path, backend: Any, config: TokenizerConfig) -> None:
    """tokenizer.json + tokenizer_config.json, as a directory transformers' AutoTokenizer loads."""
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / JSON_FILE))
    data: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": config.bos_token,
        "eos_token": config.eos_token,
        "unk_token": config.unk_token,
        "pad_token": config.pad_token,
        "add_bos_token": bool(config.add_bos_token),
        "add_eos_token": bool(config.add_eos_token),
        "clean_up_tokenization_spaces": False,
    }
    if config.chat_template is not None:
        data["chat_template"] = config.chat_template
    (directory / CONFIG_FILE).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if config.stop_ids:
        (directory / GENERATION_FILE).write_text(json.dumps({"eos_token_id": list(config.stop_ids)}) + "\n")


def is_replacement_tail(text: str) -> bool:
    return text.endswith(_REPLACEMENT)
