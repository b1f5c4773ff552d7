"""Prefill and decoding with the KV cache; a chat session that reuses the cache.

Sampling (the pure functions) lives in llamactl.sampling.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llamactl.chat import TEMPLATE_NAME, ChatTemplate, Dialog, Message, check_special_tags, encode_dialog, encode_with
from llamactl.errors import LlamactlError, UsageError
from llamactl.graphs import decode_step
from llamactl.model import Transformer
from llamactl.sampling import SamplingParams, make_generator, sample
from llamactl.tokenizer import StreamDecoder, Tokenizer, open_tokenizer

if TYPE_CHECKING:
    from llamactl.loading import LoadedModel


class ContextOverflowError(LlamactlError):
    """A prompt does not fit in the model's context window."""


# ---------------------------------------------------------------- model steps


@torch.inference_mode()
def prefill(model: Transformer, ids: Sequence[int], start: int, chunk: int = 512) -> torch.Tensor:
    """Run `ids` at positions start.. through the model (filling the cache); last logits [V].

    Long prompts go in chunks so the logits of a 4096-token prompt never exist all at once.
    """
    device = model.tok_embeddings.weight.device
    ids = list(ids)
    for offset in range(0, len(ids), chunk):
        tokens = torch.tensor([ids[offset : offset + chunk]], dtype=torch.long, device=device)
        logits = model(tokens, start + offset)[0, -1]
    return logits


@torch.inference_mode()
def decode_one(model: Transformer, token: int, pos: int) -> torch.Tensor:
    """One decoding step: `token` at position `pos`; logits [V] for the next one."""
    device = model.tok_embeddings.weight.device
    return decode_step(model, torch.tensor([[token]], dtype=torch.long, device=device), pos)[0, -1]


class Generation:
    """Iterate to get new token ids; prefill happens on the first `next()`.

    The cache must already hold positions 0..start-1; `ids` are fed at start. Stops at a
    stop id (not yielded), after `max_new_tokens`, or when the context is full.
    Afterwards: `stop_reason` ("eos", "length", "context"), `cache_len` (positions whose
    keys/values are in the cache), `prefilled`, `ttft` (seconds to the first token),
    `decode_seconds` (first to last token).
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
    ) -> None:
        if not ids:
            raise LlamactlError("nothing to generate from: the prompt has no tokens")
        self.model, self.ids, self.start = model, list(ids), start
        self.sampling = sampling or SamplingParams()
        self.generator = generator
        self.stop_ids = set(stop_ids)
        self.max_new_tokens = max_new_tokens if max_new_tokens is not None else self.sampling.max_new_tokens
        self.context = model.cache_len
        self.cache_len = start
        self.prefilled = 0
        self.produced: list[int] = []
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
        while True:
            token = sample(logits, self.sampling, self.generator)
            now = time.perf_counter()
            if self.ttft is None:
                self.ttft, first = now - t0, now
            self.decode_seconds = now - first
            if token in self.stop_ids:
                self.stop_reason = "eos"
                return
            self.produced.append(token)
            yield token
            if self.max_new_tokens is not None and len(self.produced) >= self.max_new_tokens:
                self.stop_reason = "length"
                return
            if self.cache_len >= self.context:
                self.stop_reason = "context"
                return
            logits = decode_one(self.model, token, self.cache_len)
            self.cache_len += 1

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
) -> Iterator[int]:
    """Plain completion from a fresh cache: new token ids, one at a time."""
    sampling = sampling or SamplingParams()
    generator, _ = make_generator(seed if seed is not None else sampling.seed)
    if model.cache_len == 0:
        model.setup_cache(1)
    yield from Generation(
        model, prompt, sampling=sampling, generator=generator, stop_ids=stop_ids, max_new_tokens=max_new_tokens
    )


class Completion:
    """Plain text completion (Meta's text_completion: the prompt after a BOS id), streamed as text.

    The text is the continuation of the prompt, so a leading space of the first new token
    is kept; from an empty prompt (BOS alone) it is the decode of the new tokens.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, prompt: str, sampling: SamplingParams) -> None:
        self.tokenizer, self.sampling = tokenizer, sampling.validate()
        self.prompt_ids = tokenizer.encode(prompt, bos=True)
        if model.cache_len == 0:
            model.setup_cache(1)
        context = model.cache_len
        if len(self.prompt_ids) >= context:
            raise ContextOverflowError(
                f"prompt: {len(self.prompt_ids)} tokens leave no room for an answer in the context of {context} tokens"
            )
        generator, self.seed = make_generator(sampling.seed)
        self.run = Generation(
            model, self.prompt_ids, sampling=sampling, generator=generator, stop_ids=[tokenizer.eos_id]
        )
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        decoder = StreamDecoder(self.tokenizer, context=self.prompt_ids)
        yield from decoder.stream(self.run)
        self.text = decoder.text


# ---------------------------------------------------------------- chat session


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class TurnStats:
    """What a finished (or cut) answer cost; `prompt_tokens` is the whole encoded dialog."""

    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    reused_tokens: int = 0
    new_tokens: int = 0
    ttft: float | None = None
    tokens_per_second: float | None = None
    seconds: float = 0.0
    stop_reason: str | None = None
    dropped_exchanges: int = 0


@dataclass
class ChatSession:
    """A conversation whose KV cache survives between turns.

    Each turn encodes the whole dialog with `encode_dialog` (so the model always sees Meta's
    exact template), compares it with the ids already in the cache and prefills only what
    differs: normally just the previous answer's tail and the new user turn.
    """

    model: Transformer
    tokenizer: Tokenizer
    sampling: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    messages: Dialog = field(default_factory=list)
    overflow: str = "drop"  # or "error"
    context: int | None = None
    cached: list[int] = field(default_factory=list)  # ids whose keys/values are in the cache
    last: TurnStats | None = None
    seed_used: int | None = None
    last_dropped: int = 0
    template: str = TEMPLATE_NAME  # its name, for /show and --json
    encode: ChatTemplate = encode_dialog  # a plugin's template (llamactl.chat.chat_template) may replace it

    def __post_init__(self) -> None:
        if self.overflow not in ("drop", "error"):
            raise LlamactlError(f"overflow must be 'drop' or 'error', got {self.overflow!r}")
        if self.messages and self.messages[0].role == "system":
            self.system, self.messages = self.messages[0].content, list(self.messages[1:])
        if self.system is not None:
            check_special_tags(self.system, "system prompt")
        self.context = self.context or self.model.args.max_seq_len
        if self.model.cache_len < self.context:
            self.model.setup_cache(1, self.context)
        self._generator, self.seed_used = make_generator(self.sampling.seed)

    # -- dialog --------------------------------------------------------------------------
    def dialog(self) -> Dialog:
        """System message (if any) followed by the conversation."""
        head = [Message("system", self.system)] if self.system else []
        return head + list(self.messages)

    def token_ids(self) -> list[int]:
        """The exact ids of the current dialog (a prompt if it ends with the user)."""
        return encode_with(self.encode, self.tokenizer, self.dialog())

    def reset(self) -> None:
        self.messages = []

    def set_system(self, text: str | None) -> None:
        if text:
            check_special_tags(text, "system prompt")
        self.system = text or None

    def reseed(self, seed: int | None) -> None:
        self.sampling = dataclasses.replace(self.sampling, seed=seed)
        self._generator, self.seed_used = make_generator(seed)

    def undo(self) -> bool:
        """Forget the last exchange (or a dangling user message); False when empty."""
        if not self.messages:
            return False
        if self.messages[-1].role == "assistant":
            self.messages.pop()
        if self.messages and self.messages[-1].role == "user":
            self.messages.pop()
        return True

    def last_user(self) -> str | None:
        for message in reversed(self.messages):
            if message.role == "user":
                return message.content
        return None

    def fit(self, reserve: int) -> int:
        """Drop the oldest exchanges until the pending prompt plus `reserve` fits; returns how many.

        Nothing changes when it cannot fit (or `overflow` is "error"): ContextOverflowError.
        """
        messages = list(self.messages)
        head = [Message("system", self.system)] if self.system else []
        dropped = 0
        while True:
            size = len(self.encode(self.tokenizer, head + messages))
            if size + reserve <= self.context:
                self.messages = messages
                return dropped
            if self.overflow == "error" or len(messages) < 3:
                hint = "" if self.overflow == "error" else " even with all earlier exchanges dropped"
                raise ContextOverflowError(
                    f"prompt: {size} tokens plus {reserve} reserved for the answer exceed the context of "
                    f"{self.context} tokens{hint}"
                )
            del messages[:2]
            dropped += 1

    def _reserve(self) -> int:
        wanted = self.sampling.max_new_tokens or max(1, self.context // 8)
        return max(1, min(wanted, self.context // 2))

    # -- one turn ------------------------------------------------------------------------
    def ask(self, text: str) -> Iterator[str]:
        """Add a user message and stream the answer as text pieces.

        The answer joins the dialog when the iterator ends, also when it is closed early
        or interrupted (Ctrl-C): then it is kept, marked `cut`.
        """
        check_special_tags(text, "message")
        if self.messages and self.messages[-1].role == "user":
            self.messages.pop()  # a previous prompt that never got an answer
        self.messages.append(Message("user", text))
        try:
            dropped = self.fit(self._reserve())
        except ContextOverflowError:
            self.messages.pop()
            raise
        self.last_dropped = dropped
        return self._answer(dropped)

    def retry(self) -> Iterator[str]:
        """Answer the last user message again (the previous answer is discarded)."""
        if self.messages and self.messages[-1].role == "assistant":
            self.messages.pop()
        if not self.messages:
            raise LlamactlError("nothing to retry: the conversation is empty")
        return self.ask(self.messages.pop().content)

    def _answer(self, dropped: int) -> Iterator[str]:
        t0 = time.perf_counter()
        prompt = self.encode(self.tokenizer, self.dialog())
        reuse = _common_prefix_len(self.cached, prompt)
        if reuse == len(prompt):  # the last prompt token must run to give logits
            reuse -= 1
        self.cached = self.cached[:reuse]
        run = Generation(
            self.model,
            prompt[reuse:],
            start=reuse,
            sampling=self.sampling,
            generator=self._generator,
            stop_ids=[self.tokenizer.eos_id],
            max_new_tokens=self.sampling.max_new_tokens,
        )
        stats = TurnStats(prompt_tokens=len(prompt), reused_tokens=reuse, dropped_exchanges=dropped)
        self.last = stats
        decoder = StreamDecoder(self.tokenizer)
        finished = False
        try:
            yield from decoder.stream(run)
            finished = True
        finally:
            self.cached = (prompt + run.produced)[: run.cache_len]
            stats.prefilled_tokens = run.prefilled
            stats.new_tokens = len(run.produced)
            stats.ttft, stats.tokens_per_second = run.ttft, run.tokens_per_second
            stats.stop_reason = run.stop_reason if finished else "interrupted"
            stats.seconds = time.perf_counter() - t0
            if not finished and not run.produced:
                self.messages.pop()  # stopped before the first token: as if never asked
            else:
                cut = not finished or run.stop_reason == "context"
                self.messages.append(Message("assistant", self.tokenizer.decode(run.produced), cut=cut))


# ---------------------------------------------------------------- loading for the commands


def load_for_generation(
    model: str | Path,
    tokenizer: str | Path | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    ctx: int | None = None,
    bits: int | None = None,
) -> tuple[LoadedModel, Tokenizer]:
    """Model and matching tokenizer; the tokenizer is checked before any weight is read."""
    from llamactl.checkpoint import open_checkpoint
    from llamactl.loading import load_model

    if ctx is not None and ctx < 2:
        raise UsageError(f"--ctx {ctx}: the context must hold at least 2 tokens")
    reader = open_checkpoint(model)
    tok = open_tokenizer(tokenizer, reader.tokenizer_path, reader.path, reader.args.vocab_size)
    return load_model(reader.path, device=device, dtype=dtype, max_seq_len=ctx, bits=bits), tok
