"""Choosing the next token from logits: pure functions over tensors, no model, no state.

Sampling follows Meta's reference: softmax(logits / temperature), then nucleus (top-p)
sampling; temperature 0 is greedy argmax. The order is transformers': the repetition
penalty on the raw logits (greedy too), then temperature, top-k, top-p, min-p. Random draws
happen on the CPU from a seeded `torch.Generator`, so a seed gives the same text on any
device for the same logits.

Stop strings are text, not tokens: `StopMatcher` holds back streamed text that could still
become a stop string, so one is never printed, also when it spans several tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llamactl.errors import LlamactlError


@dataclass
class SamplingParams:
    """Meta's defaults: temperature 0.6, top-p 0.9; top_k 0 means off; None seed = random.

    repeat_penalty 1.0, min_p 0.0 and no stop strings are off (the reference sampler);
    the penalty looks at the last `repeat_last_n` tokens of the context (llama.cpp's 64).
    logprobs > 0 records the log-probabilities of that many most likely tokens per step.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    seed: int | None = None
    max_new_tokens: int | None = None
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    min_p: float = 0.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    logprobs: int = 0

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
            (self.repeat_penalty > 0, f"repeat_penalty must be > 0, got {self.repeat_penalty}"),
            (self.repeat_last_n >= 0, f"repeat_last_n must be >= 0, got {self.repeat_last_n}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (all(self.stop), "a stop string must not be empty"),
            (0 <= self.logprobs <= 20, f"logprobs must be in 0..20, got {self.logprobs}"),
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


def repetition_penalty(logits: torch.Tensor, previous: Sequence[int], penalty: float) -> torch.Tensor:
    """The CTRL rule (transformers' RepetitionPenaltyLogitsProcessor, llama.cpp's repeat penalty):
    the logit of every token already in `previous` is divided by `penalty` when positive and
    multiplied by it when negative, so penalty > 1 always makes a repeat less likely. logits [V]."""
    if penalty == 1.0 or not previous:
        return logits
    ids = torch.tensor(sorted(set(previous)), dtype=torch.long, device=logits.device)
    seen = logits.gather(-1, ids)
    return logits.scatter(-1, ids, torch.where(seen < 0, seen * penalty, seen / penalty))


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


def min_p_filter(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p: drop tokens less likely than min_p times the most likely one; renormalise."""
    if min_p <= 0.0:
        return probs
    kept = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def sampling_probs(
    logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> torch.Tensor:
    """The distribution a temperature > 0 draw samples from (fp32, on the CPU)."""
    logits = top_k_filter(logits.detach().float().cpu() / temperature, top_k)
    return min_p_filter(top_p_filter(torch.softmax(logits, dim=-1), top_p), min_p)


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, previous: Sequence[int] = ()
) -> int:
    """One next token from logits [V]: greedy at temperature 0, else a seeded draw.

    `previous` are the ids before this one (prompt and answer); the repetition penalty looks
    at the last `repeat_last_n` of them.
    """
    if params.repeat_penalty != 1.0 and params.repeat_last_n:
        logits = repetition_penalty(logits, previous[-params.repeat_last_n :], params.repeat_penalty)
    if params.temperature == 0:
        return greedy(logits)
    probs = sampling_probs(logits, params.temperature, params.top_p, params.top_k, params.min_p)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


def top_logprobs(logits: torch.Tensor, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` and of the n most likely tokens under the model.

    The model's own distribution (log-softmax of the raw logits, before penalty, temperature
    and filters), as OpenAI's `logprobs` reports it. logits [V].
    """
    logp = torch.log_softmax(logits.detach().float().cpu(), dim=-1)
    top = torch.topk(logp, min(n, logp.shape[-1]))
    return float(logp[token]), [(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)]


class StopMatcher:
    """Streamed text in, text safe to show out, until a stop string appears.

    Text that could be the start of a stop string is held back until the next piece decides;
    when a stop string is complete, what precedes it is released and `stopped` is set. The
    stop string itself and anything after it are never released.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The part of everything fed so far that is now safe to print."""
        if self.stopped:
            return ""
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[: min(hits)]
        hold = max((_overlap(text, s) for s in self.stops), default=0)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """What was held back, when the text ends without completing a stop string."""
        text, self.pending = self.pending, ""
        return text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def make_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """A CPU generator and the seed it uses (a fresh random one when None, reported for reruns)."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen, seed
