"""Running the model over a prompt and then token by token: prefill, decode_one, Generation.

The loop is the same for plain completion and chat: prefill the prompt (filling the KV
cache), then sample a token, feed it back through the decode step, repeat. The decode step
(`llamactl.engine`: eager, CUDA graph) is an argument, chosen once when the model is loaded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from llamactl.engine import DecodeStep, EagerStep
from llamactl.errors import LlamactlError
from llamactl.model import Transformer
from llamactl.sampling import SamplingParams, StopMatcher, make_generator, sample, top_logprobs
from llamactl.tokenizer import StreamDecoder, Tokenizer, stop_ids


class ContextOverflowError(LlamactlError):
    """A prompt does not fit in the model's context window."""


@torch.inference_mode()
def prefill(model: Transformer, ids: Sequence[int], start: int, chunk: int = 512) -> torch.Tensor:
    """Run `ids` at positions start.. through the model (filling the cache); last logits [V].

    Long prompts go in chunks so the logits of a 4096-token prompt never exist all at once.
    Each chunk reads only the cache positions filled so far (the model's default): a prefill
    needs no static shapes, and reading the whole 4096-position cache instead was slower in
    every run on a CPU (2 threads, medians of 7 interleaved runs), e.g. 512 tokens of
    stories260K 28 against 176 ms, a 40-token chat turn at position 600 5 against 17 ms, and
    512 tokens of a dim-512 model 304 against 473 ms.
    """
    device = model.tok_embeddings.weight.device
    ids = list(ids)
    for offset in range(0, len(ids), chunk):
        tokens = torch.tensor([ids[offset : offset + chunk]], dtype=torch.long, device=device)  # [1,T]
        logits = model(tokens, start + offset, last_only=True)[0, -1]
    return logits


@torch.inference_mode()
def decode_one(step: DecodeStep, token: int, pos: int) -> torch.Tensor:
    """One decoding step: `token` at position `pos`; logits [V] for the next one."""
    device = step.model.tok_embeddings.weight.device
    return step(torch.tensor([[token]], dtype=torch.long, device=device), pos)[0, -1]


class Generation:
    """Iterate to get new token ids; prefill happens on the first `next()`.

    The cache must already hold positions 0..start-1 (`history`: their ids, for the
    repetition penalty); `ids` are fed at start. Stops at a stop id (not yielded), after
    `max_new_tokens`, or when the context is full. `step` decodes each new token (default:
    eager). Afterwards: `stop_reason` ("eos", "length", "context"; "stop" when a caller
    ended it at a stop string), `cache_len` (positions whose keys/values are in the cache),
    `prefilled`, `ttft` (seconds to the first token), `decode_seconds` (first to last
    token), `logprobs` (with sampling.logprobs > 0: one (logprob, top) pair per new token).
    """

    def __init__(
        self,
        model: Transformer,
        ids: Sequence[int],
        *,
        start: int = 0,
        sampling: SamplingParams | None = None,
        generator: torch.Generator | None = None,
        stop_ids: Sequence[int] = (),
        max_new_tokens: int | None = None,
        step: DecodeStep | None = None,
        history: Sequence[int] = (),
    ) -> None:
        if not ids:
            raise LlamactlError("nothing to generate from: the prompt has no tokens")
        self.history = list(history)
        self.step = step or EagerStep(model)
        assert self.step.model is model, "the decode step is bound to another model"
        self.model, self.ids, self.start = model, list(ids), start
        self.sampling = sampling or SamplingParams()
        self.generator = generator
        self.stop_ids = set(stop_ids)
        self.max_new_tokens = max_new_tokens if max_new_tokens is not None else self.sampling.max_new_tokens
        self.context = model.cache_len
        self.cache_len = start
        self.prefilled = 0
        self.produced: list[int] = []
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.stop_reason: str | None = None
        self.ttft: float | None = None
        self.decode_seconds = 0.0
        if start + len(self.ids) > self.context:
            raise ContextOverflowError(
                f"prompt of {start + len(self.ids)} tokens does not fit the context of {self.context} tokens"
            )

    def __iter__(self) -> Iterator[int]:
        t0 = first = time.perf_counter()
        logits = prefill(self.model, self.ids, self.start)
        self.prefilled = len(self.ids)
        self.cache_len = self.start + len(self.ids)
        window = self.sampling.repeat_last_n if self.sampling.repeat_penalty != 1.0 else 0
        while True:
            previous = self._recent(window)
            token = sample(logits, self.sampling, self.generator, previous)
            if self.sampling.logprobs:
                self.logprobs.append(top_logprobs(logits, token, self.sampling.logprobs))
            now = time.perf_counter()
            if self.ttft is None:
                self.ttft, first = now - t0, now
            self.decode_seconds = now - first
            if token in self.stop_ids:
                self.stop_reason = "eos"
                if self.logprobs:
                    self.logprobs.pop()  # the EOS is not part of the answer
                return
            self.produced.append(token)
            yield token
            if self.max_new_tokens is not None and len(self.produced) >= self.max_new_tokens:
                self.stop_reason = "length"
                return
            if self.cache_len >= self.context:
                self.stop_reason = "context"
                return
            logits = decode_one(self.step, token, self.cache_len)
            self.cache_len += 1

    def _recent(self, n: int) -> list[int]:
        """The last n ids of the context (history, prompt, answer so far), for the repetition penalty."""
        if n <= 0:
            return []
        if len(self.produced) >= n:
            return self.produced[-n:]
        return (self.history + self.ids)[-(n - len(self.produced)) :] + self.produced

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed over the tokens after the first (None with fewer than two)."""
        if len(self.produced) < 2 or self.decode_seconds <= 0:
            return None
        return (len(self.produced) - 1) / self.decode_seconds


def generate(
    model: Transformer,
    prompt: Sequence[int],
    *,
    sampling: SamplingParams | None = None,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
    max_new_tokens: int | None = None,
    step: DecodeStep | None = None,
) -> Iterator[int]:
    """Plain completion of token ids (allocating a cache if the model has none), one id at a time."""
    sampling = sampling or SamplingParams()
    generator, _ = make_generator(seed if seed is not None else sampling.seed)
    if model.cache_len == 0:
        model.setup_cache(1)
    yield from Generation(
        model,
        prompt,
        sampling=sampling,
        generator=generator,
        stop_ids=stop_ids,
        max_new_tokens=max_new_tokens,
        step=step,
    )


def stream_text(decoder: StreamDecoder, run: Generation, stops: Sequence[str] = ()) -> Iterator[str]:
    """The text of `run` piece by piece, ended before the first stop string (never shown).

    At a stop string the generation is closed (no more tokens are computed) and its
    `stop_reason` becomes "stop". Pieces are held back only while they could still begin one.
    """
    if not stops:
        yield from decoder.stream(run)
        return
    matcher = StopMatcher(stops)
    pieces = decoder.stream(run)
    for piece in pieces:
        safe = matcher.feed(piece)
        if safe:
            yield safe
        if matcher.stopped:
            pieces.close()
            run.stop_reason = "stop"
            return
    tail = matcher.flush()
    if tail:
        yield tail


class Completion:
    """Plain text completion (Meta's text_completion: the prompt after a BOS id), streamed as text.

    The text is the continuation of the prompt, so a leading space of the first new token
    is kept; from an empty prompt (BOS alone) it is the decode of the new tokens. A tokenizer
    whose texts start without BOS (`add_bos` false: GPT-2-style BPE) gets none, as
    transformers encodes the prompt. `prompt_ids` (a chat template's framing of the prompt)
    replaces the encoding; the answer is then decoded as a text of its own, as a chat turn is.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        prompt: str,
        sampling: SamplingParams,
        step: DecodeStep | None = None,
        prompt_ids: list[int] | None = None,
    ) -> None:
        self.tokenizer, self.sampling = tokenizer, sampling.validate()
        self.framed = prompt_ids is not None
        bos = getattr(tokenizer, "add_bos", True) or not prompt  # "" still starts from BOS
        self.prompt_ids = list(prompt_ids) if prompt_ids is not None else tokenizer.encode(prompt, bos=bos)
        if model.cache_len == 0:
            model.setup_cache(1)
        context = model.cache_len
        if len(self.prompt_ids) >= context:
            raise ContextOverflowError(
                f"prompt: {len(self.prompt_ids)} tokens leave no room for an answer in the context of {context} tokens"
            )
        generator, self.seed = make_generator(sampling.seed)
        self.run = Generation(
            model, self.prompt_ids, sampling=sampling, generator=generator, stop_ids=stop_ids(tokenizer), step=step
        )
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        decoder = StreamDecoder(self.tokenizer, context=() if self.framed else self.prompt_ids)
        for piece in stream_text(decoder, self.run, self.sampling.stop):
            self.text += piece
            yield piece


__all__ = [
    "Completion",
    "ContextOverflowError",
    "Generation",
    "SamplingParams",
    "decode_one",
    "generate",
    "prefill",
    "stream_text",
]
