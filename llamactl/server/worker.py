"""One model, one request at a time: the thread that owns a model and its KV cache.

The model decodes a batch of one (its cache holds one sequence), so requests wait in a
bounded queue and run in turn. The cache survives between requests: a prompt that starts
with the ids the cache already holds (the next turn of the same conversation, or the same
system prompt) prefills only the rest, as `ChatSession` does between turns.

The worker knows nothing of HTTP or asyncio: each job carries an `emit` callback that
receives `Piece`, then one `Finished` or `Failed`. Setting `job.cancel()` (a client went
away, the server stops) ends its generation before the next decode step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llamactl.engine import DecodeStep
from llamactl.errors import LlamactlError
from llamactl.generate import Generation
from llamactl.model import Transformer
from llamactl.sampling import SamplingParams, make_generator
from llamactl.server.stops import StopScanner
from llamactl.session import reusable_prefix
from llamactl.tokenizer import StreamDecoder, Tokenizer, stop_ids


class QueueFullError(LlamactlError):
    """Every place in a model's queue is taken (HTTP 429)."""


class ShuttingDownError(LlamactlError):
    """The server is stopping and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class Piece:
    """Newly complete answer text."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The answer is complete. `finish_reason` is OpenAI's "stop" / "length", or "cancelled".

    `cached_tokens` of the prompt kept their keys/values from an earlier request; times are
    seconds from `submit` (`ttft`: to the first new token).
    """

    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    seed: int
    queued_s: float
    ttft: float | None
    tokens_per_second: float | None
    seconds: float


@dataclass(frozen=True)
class Failed:
    """The request broke inside the worker (a bug, not bad input: that is refused before)."""

    message: str


Event = Piece | Finished | Failed


@dataclass
class Job:
    """One queued request: prompt ids, sampling (its `max_new_tokens` is the request's max_tokens)."""

    prompt: list[int]
    sampling: SamplingParams
    emit: Callable[[Event], None]
    stops: Sequence[str] = ()
    continuation: bool = False  # text continues the prompt (completions) or starts afresh (chat answers)
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class ModelWorker:
    """Serve one model from one thread: at most one running job and `max_queue` waiting.

    The model's cache is (re)allocated for one sequence of `model.args.max_seq_len` when it
    has none. `step` is the decode step chosen at load (a tensor-parallel step would drive
    all ranks from here: the worker only ever calls the step and the model on this rank).
    """

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, step: DecodeStep | None = None, max_queue: int = 64
    ) -> None:
        if max_queue < 0:
            raise LlamactlError(f"queue bound must be >= 0, got {max_queue}")
        if model.cache_len == 0:
            model.setup_cache(1, model.args.max_seq_len)
        self.model, self.tokenizer, self.step, self.max_queue = model, tokenizer, step, max_queue
        self.context = model.cache_len
        self.cached: list[int] = []  # ids whose keys/values are in the cache (worker thread only)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: list[Job] = []  # queued and running, in order
        self._lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="llamactl-model", daemon=True)
        self._thread.start()

    # -- the HTTP side ----------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue `job`; QueueFullError when full, ShuttingDownError once closing."""
        with self._lock:
            if self._closing:
                raise ShuttingDownError("the server is shutting down")
            if len(self._jobs) > self.max_queue:
                raise QueueFullError(
                    f"the model is busy: {len(self._jobs) - 1} requests are waiting (the queue holds {self.max_queue})"
                )
            self._jobs.append(job)
        self._queue.put(job)
        return job

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        with self._lock:
            return len(self._jobs)

    def cancel_all(self) -> int:
        """Refuse new jobs and cancel every queued and running one; how many were cancelled."""
        with self._lock:
            self._closing = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        return len(jobs)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the thread."""
        self.cancel_all()
        self._queue.put(None)
        self._thread.join(timeout)

    # -- the model thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                self._run(job)
            except Exception as exc:  # the one thread serving the model must outlive any request
                self.cached = []  # the cache may hold anything now
                job.emit(Failed(f"{type(exc).__name__}: {exc}"))
            finally:
                with self._lock:
                    self._jobs.remove(job)

    def _run(self, job: Job) -> None:
        started = time.perf_counter()
        generator, seed = make_generator(job.sampling.seed)
        stats = dict(prompt_tokens=len(job.prompt), seed=seed, queued_s=started - job.submitted)
        if job.cancelled.is_set():  # gone while it waited
            job.emit(self._finished(job, "cancelled", stats, cached=0, produced=0, ttft=None, tps=None))
            return
        reuse = reusable_prefix(self.cached, job.prompt)
        self.cached = self.cached[:reuse]
        run = Generation(
            self.model,
            job.prompt[reuse:],
            start=reuse,
            sampling=job.sampling,
            generator=generator,
            stop_ids=stop_ids(self.tokenizer),
            max_new_tokens=job.sampling.max_new_tokens,
            step=self.step,
        )
        decoder = StreamDecoder(self.tokenizer, context=job.prompt if job.continuation else ())
        scanner = StopScanner(job.stops)
        reason, ttft = "", None
        try:
            for token in run:
                ttft = ttft if ttft is not None else time.perf_counter() - job.submitted
                if job.cancelled.is_set():  # checked before every decode step: nothing more is computed
                    reason = "cancelled"
                    break
                if text := scanner.feed(decoder.push(token)):
                    job.emit(Piece(text))
                if scanner.hit is not None:
                    reason = "stop"
                    break
            else:
                if text := scanner.feed(decoder.finish()) + scanner.flush():
                    job.emit(Piece(text))
                reason = "stop" if scanner.hit is not None or run.stop_reason == "eos" else "length"
        finally:
            self.cached = (job.prompt + run.produced)[: run.cache_len]
        job.emit(
            self._finished(
                job, reason, stats, cached=reuse, produced=len(run.produced), ttft=ttft, tps=run.tokens_per_second
            )
        )

    @staticmethod
    def _finished(
        job: Job, reason: str, stats: dict, cached: int, produced: int, ttft: float | None, tps: float | None
    ) -> Finished:
        return Finished(
            finish_reason=reason,
            cached_tokens=cached,
            completion_tokens=produced,
            ttft=ttft,
            tokens_per_second=tps,
            seconds=time.perf_counter() - job.submitted,
            **stats,
        )
