"""How much a quantized checkpoint changed the model: both run on one text, compared.

The unquantized model is loaded, run and freed before the quantized one is loaded, so peak
memory is one model, not two.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from llamactl.checkpoint import CheckpointReader, open_checkpoint
from llamactl.devices import resolve
from llamactl.errors import UsageError
from llamactl.quantize.quality import Quality, compare_logits, model_logits

if TYPE_CHECKING:
    import torch


def read_eval_text(path: str | os.PathLike[str]) -> str:
    """An evaluation text file as UTF-8, with a one-line error naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: evaluation text file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the evaluation text as UTF-8 ({exc})") from None


def eval_tokens(reader: CheckpointReader, text: str, max_tokens: int = 2048) -> torch.Tensor:
    """BOS + the text's tokens (at most max_tokens), checked against the model's vocabulary."""
    import torch

    from llamactl.tokenizer import load_tokenizer

    if reader.tokenizer_path is None:
        raise UsageError(f"{reader.path}: no tokenizer.model, so quality cannot be measured (skip the evaluation)")
    tokenizer = load_tokenizer(reader.tokenizer_path)
    ids = tokenizer.encode(text, bos=True)[:max_tokens]
    if len(ids) < 2:
        raise UsageError("the evaluation text is empty: it needs at least one token to predict")
    if max(ids) >= reader.args.vocab_size:
        raise UsageError(
            f"{reader.tokenizer_path}: token id {max(ids)} >= the model's vocab_size "
            f"{reader.args.vocab_size}; tokenizer and model do not match"
        )
    return torch.tensor(ids)


def evaluate_quality(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    tokens: torch.Tensor,
    *,
    device: str | None = None,
    dtype: str | None = None,
) -> Quality:
    """Perplexity of both models, top-1 agreement and mean KL on `tokens` (see `eval_tokens`)."""
    from llamactl.loading import build_model

    reader = open_checkpoint(src)
    placement = resolve(device, dtype)
    window = min(reader.args.max_seq_len, 512)
    model = build_model(reader, placement.device, placement.dtype)
    ref = model_logits(model, tokens, window)
    del model
    quantized = build_model(open_checkpoint(dst), placement.device, placement.dtype)
    return compare_logits(ref, model_logits(quantized, tokens, window), tokens)
