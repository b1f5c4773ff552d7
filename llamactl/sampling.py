"""Choosing the next token from logits: pure functions over tensors, no model, no state.

Sampling follows Meta's reference: softmax(logits / temperature), then nucleus (top-p)
sampling; temperature 0 is greedy argmax. Top-k is applied before top-p as transformers
does. Random draws happen on the CPU from a seeded `torch.Generator`, so a seed gives the
same text on any device for the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamactl.errors import LlamactlError


@dataclass
class SamplingParams:
    """Meta's defaults: temperature 0.6, top-p 0.9; top_k 0 means off; None seed = random."""

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    seed: int | None = None
    max_new_tokens: int | None = None

    def validate(self) -> SamplingParams:
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            # torch.Generator.manual_seed takes [-2**63, 2**64); beyond it torch raises OverflowError.
            (self.seed is None or -(2**63) <= self.seed < 2**64, f"seed must fit in 64 bits, got {_short(self.seed)}"),
            (
                self.max_new_tokens is None or self.max_new_tokens > 0,
                f"max_new_tokens must be positive, got {self.max_new_tokens}",
            ),
        ]
        for ok, why in checks:
            if not ok:
                raise LlamactlError(why)
        return self


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"{text[:10]}...({len(text)} digits)"


def greedy(logits: torch.Tensor) -> int:
    """The most likely token (the first one on ties, like torch/transformers argmax)."""
    return int(torch.argmax(logits, dim=-1))


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits with all but the k largest set to -inf (k <= 0 or >= vocab: unchanged)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Meta's nucleus rule: keep the most likely tokens until their mass reaches p; renormalise."""
    if p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > p  # mass *before* a token already > p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """The distribution a temperature > 0 draw samples from (fp32, on the CPU)."""
    logits = top_k_filter(logits.detach().float().cpu() / temperature, top_k)
    return top_p_filter(torch.softmax(logits, dim=-1), top_p)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One next token from logits [V]: greedy at temperature 0, else a seeded draw."""
    if params.temperature == 0:
        return greedy(logits)
    probs = sampling_probs(logits, params.temperature, params.top_p, params.top_k)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


def make_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """A CPU generator and the seed it uses (a fresh random one when None, reported for reruns)."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen, seed
