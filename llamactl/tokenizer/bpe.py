"""A GGUF `gpt2` vocabulary (byte-level BPE: tokens, merges, token types) as a `tokenizers` object.

A GGUF carries no tokenizer.json, only what llama.cpp needs: the tokens (already spelled in
GPT-2's byte alphabet, `Ġthe`), the merges in rank order, a type per token and the name of
the pre-tokenizer (`tokenizer.ggml.pre`). The tokenizer built here is the one transformers'
GGUF loader builds (integrations/gguf: GPT2Tokenizer's BPE with ByteLevel pre-tokenizer and
decoder, control tokens special, user-defined tokens added whole, the split regex by
`pre`), so both read a file to the same ids; tests check it against transformers itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llamactl.errors import TokenizerError

CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType

# Llama 3's split regex (llama.cpp LLAMA_VOCAB_PRE_TYPE_LLAMA3); any other `pre` keeps GPT-2's
# own regex inside ByteLevel, as transformers does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS: dict[str, str] = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe")}


def _byte_alphabet() -> set[str]:
    """GPT-2's bytes_to_unicode: the 256 characters byte-level tokens are spelled with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [256 + n for n in range(256 - len(printable))]
    return {chr(c) for c in printable} | {chr(c) for c in extra}


def byte_level_bpe(
    tokens: Sequence[str], merges: Sequence[str], types: Sequence[int], pre: str | None, where: str
) -> Any:
    """The `tokenizers.Tokenizer` of a byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError(f"{where}: a token appears twice in tokenizer.ggml.tokens")
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise TokenizerError(f"{where}: tokenizer.ggml.merges holds {merge[:40]!r}, not 'left right'")
        pairs.append((left, right))
    try:
        model = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False)
    except Exception as exc:  # a merge naming a token the vocabulary lacks
        raise TokenizerError(f"{where}: the BPE merges do not fit the vocabulary ({exc})") from None
    tokenizer = Tokenizer(model)
    split = SPLITS.get(pre or "")
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = _byte_alphabet()
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel; transformers skips it.
    control = [t for t, kind in zip(tokens, types) if kind == CONTROL and set(t) <= alphabet]
    user = [t for t, kind in zip(tokens, types) if kind == USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tokenizer
