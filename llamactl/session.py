"""A chat conversation over one model whose KV cache survives between turns.

Each turn encodes the dialog once with the session's template (so the model always sees
the template's exact ids), keeps the longest prefix the cache already holds and prefills
only the rest: normally the previous answer's tail and the new user message. When the
dialog outgrows the context, the oldest exchanges are dropped (the system prompt stays).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from llamactl.engine import DecodeStep
from llamactl.errors import LlamactlError
from llamactl.generate import ContextOverflowError, Generation, stream_text
from llamactl.model import Transformer
from llamactl.sampling import SamplingParams, make_generator
from llamactl.templates import LLAMA2_CHAT, ChatTemplate, Dialog, Message, check_special_tags, encode_with
from llamactl.tokenizer import StreamDecoder, Tokenizer, stop_ids


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reusable_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """How many leading ids of `prompt` can keep the keys/values the cache holds for `cached`.

    At most len(prompt) - 1: the last prompt token must run through the model to give the
    logits of the first new one.
    """
    return min(_common_prefix_len(cached, prompt), max(0, len(prompt) - 1))


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
    ids: list[int] = field(default_factory=list)  # the generated tokens (a stop string's included)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)


@dataclass
class ChatSession:
    """A conversation whose KV cache survives between turns.

    `ask(text)` streams the answer as text; `cached` holds the ids whose keys/values are
    in the cache, `last` the stats of the last answer. `step` decodes each token (default:
    eager; a loaded model brings the one chosen for it).
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
    template: ChatTemplate = LLAMA2_CHAT
    step: DecodeStep | None = None

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
        return encode_with(self.template, self.tokenizer, self.dialog())

    @property
    def context_used(self) -> int:
        """Tokens of the context the dialog takes: THE number the status line and /stats show."""
        return len(self.token_ids())

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

    def _fit(self, reserve: int) -> tuple[list[int], int]:
        """The prompt ids of the pending dialog, dropping the oldest exchanges until they plus
        `reserve` fit the context; also how many exchanges were dropped.

        Nothing changes when it cannot fit (or `overflow` is "error"): ContextOverflowError.
        """
        messages = list(self.messages)
        head = [Message("system", self.system)] if self.system else []
        dropped = 0
        while True:
            prompt = self.template.encode(self.tokenizer, head + messages)
            if len(prompt) + reserve <= self.context:
                self.messages = messages
                return prompt, dropped
            if self.overflow == "error" or len(messages) < 3:
                hint = "" if self.overflow == "error" else " even with all earlier exchanges dropped"
                raise ContextOverflowError(
                    f"prompt: {len(prompt)} tokens plus {reserve} reserved for the answer exceed the context of "
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
            prompt, dropped = self._fit(self._reserve())
        except ContextOverflowError:
            self.messages.pop()
            raise
        self.last_dropped = dropped
        return self._answer(prompt, dropped)

    def retry(self) -> Iterator[str]:
        """Answer the last user message again (the previous answer is discarded)."""
        if self.messages and self.messages[-1].role == "assistant":
            self.messages.pop()
        if not self.messages:
            raise LlamactlError("nothing to retry: the conversation is empty")
        return self.ask(self.messages.pop().content)

    def _answer(self, prompt: list[int], dropped: int) -> Iterator[str]:
        t0 = time.perf_counter()
        reuse = reusable_prefix(self.cached, prompt)
        self.cached = self.cached[:reuse]
        run = Generation(
            self.model,
            prompt[reuse:],
            start=reuse,
            sampling=self.sampling,
            generator=self._generator,
            stop_ids=stop_ids(self.tokenizer),
            max_new_tokens=self.sampling.max_new_tokens,
            step=self.step,
            history=prompt[:reuse],
        )
        stats = TurnStats(prompt_tokens=len(prompt), reused_tokens=reuse, dropped_exchanges=dropped)
        self.last = stats
        decoder = StreamDecoder(self.tokenizer)
        finished = False
        shown: list[str] = []
        try:
            for piece in stream_text(decoder, run, self.sampling.stop):
                shown.append(piece)
                yield piece
            finished = True
        finally:
            self.cached = (prompt + run.produced)[: run.cache_len]
            stats.prefilled_tokens = run.prefilled
            stats.new_tokens = len(run.produced)
            stats.ids, stats.logprobs = list(run.produced), list(run.logprobs)
            stats.ttft, stats.tokens_per_second = run.ttft, run.tokens_per_second
            stats.stop_reason = run.stop_reason if finished else "interrupted"
            stats.seconds = time.perf_counter() - t0
            if not finished and not run.produced:
                self.messages.pop()  # stopped before the first token: as if never asked
            else:
                cut = not finished or run.stop_reason == "context"
                # At a stop string the answer is what was shown: the text before it.
                text = "".join(shown) if run.stop_reason == "stop" else self.tokenizer.decode(run.produced)
                self.messages.append(Message("assistant", text, cut=cut))
