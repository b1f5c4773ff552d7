"""What quantization cost: sizes from tensor infos, quality from two models' logits.

`QuantStats` is computed from `TensorInfo`s alone (stored bytes of quantized tensors are in
their infos), so `quantize`'s report and `info` on the written checkpoint are one
computation on one source of truth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from llamactl.layout import TensorInfo

if TYPE_CHECKING:
    import torch
    from torch import nn

# A short English sample for the quality report when no evaluation text is given.
BUILTIN_SAMPLE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friends. One day, she saw a big red ball under a tree. She ran to the ball and picked it up. Her mom "
    'smiled and said, "Be careful, Lily, and share the ball with your friends." The sun was warm and the '
    "sky was blue. Lily and her friends played with the ball until it was time to go home for dinner. "
    "The history of science is the study of how people came to understand the natural world. Early "
    "scholars observed the stars, measured the seasons and wrote down what they saw, so that others could "
    "test their ideas and build on them."
)


@dataclass
class QuantStats:
    """Sizes of a quantized checkpoint against its source."""

    tensors_total: int = 0
    tensors_quantized: int = 0
    params_total: int = 0
    params_quantized: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    quantized_bytes_after: int = 0
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def compare(
        cls, before: Iterable[TensorInfo], after: Iterable[TensorInfo], skipped: Iterable[str] = ()
    ) -> QuantStats:
        """`before`: the source's infos; `after`: the quantized checkpoint's (stored bytes included)."""
        stats = cls(skipped=list(skipped))
        stats.bytes_before = sum(info.nbytes for info in before)
        for info in after:
            stats.tensors_total += 1
            stats.params_total += info.numel
            stats.bytes_after += info.nbytes
            if info.scheme is not None:
                stats.tensors_quantized += 1
                stats.params_quantized += info.numel
                stats.quantized_bytes_after += info.nbytes
        return stats

    @property
    def bits_per_weight(self) -> float:
        """Bits per quantized weight, scales and double-quant constants included."""
        return 8 * self.quantized_bytes_after / self.params_quantized if self.params_quantized else 0.0

    @property
    def model_bits_per_weight(self) -> float:
        """Bits per parameter over the whole model (unquantized tensors included)."""
        return 8 * self.bytes_after / self.params_total if self.params_total else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bits_per_weight"] = round(self.bits_per_weight, 4)
        data["model_bits_per_weight"] = round(self.model_bits_per_weight, 4)
        data["compression"] = round(self.bytes_before / self.bytes_after, 4) if self.bytes_after else None
        return data


@dataclass
class Quality:
    """Quantized vs unquantized next-token predictions on one text."""

    tokens: int
    perplexity_before: float
    perplexity_after: float
    top1_agreement: float
    mean_kl: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_logits(ref_logits: torch.Tensor, q_logits: torch.Tensor, tokens: torch.Tensor) -> Quality:
    """Perplexities, top-1 agreement and mean KL(ref || quantized) over next-token predictions.

    logits [T, V] for tokens [T]: position t predicts token t+1, so T-1 predictions count.
    """
    import torch

    ref = torch.log_softmax(ref_logits[:-1].double(), dim=-1)
    q = torch.log_softmax(q_logits[:-1].double(), dim=-1)
    target = tokens[1:].long().view(-1, 1)
    nll_ref = -ref.gather(1, target).mean()
    nll_q = -q.gather(1, target).mean()
    kl = (ref.exp() * (ref - q)).sum(-1).mean()
    agree = (ref.argmax(-1) == q.argmax(-1)).double().mean()
    return Quality(int(target.numel()), math.exp(nll_ref), math.exp(nll_q), float(agree), float(kl))


def model_logits(model: nn.Module, tokens: torch.Tensor, window: int) -> torch.Tensor:
    """fp32 logits [T, V] for one token sequence, in independent windows of `window` tokens."""
    import torch

    device = next(p for p in model.parameters()).device
    with torch.inference_mode():
        chunks = [
            model(tokens[i : i + window].view(1, -1).to(device), 0)[0].float().cpu()
            for i in range(0, tokens.numel(), window)
        ]
    return torch.cat(chunks)
