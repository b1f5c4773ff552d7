"""From a queued job to the HTTP answer: one JSON body, or OpenAI's server-sent events.

The worker's events cross from its thread into an asyncio queue. While an answer is
awaited, the client is checked every POLL_S seconds (a stream is also cancelled by the
server the moment its connection drops): a client that went away cancels its job at once,
and the request is logged when the worker has finished with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from llamactl.server import schemas
from llamactl.server.front import LogSink
from llamactl.server.schemas import APIError, ChatRequest, CompletionRequest
from llamactl.server.worker import Event, Failed, Finished, Job, ModelWorker, Piece, QueueFullError, ShuttingDownError

POLL_S = 0.1  # how often a request waiting for its answer checks that its client is still there


async def respond(
    request: Request,
    worker: ModelWorker,
    model_id: str,
    job: Job,
    body: ChatRequest | CompletionRequest,
    prefix: str,
    log: LogSink | None,
) -> Any:
    """Queue `job` on `worker` and answer: a JSON body, or server-sent events when `stream` is set.

    `prefix` names the kind of answer: "chatcmpl" (chat) or "cmpl" (text completion).
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:  # called on the worker thread
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped
            loop.call_soon_threadsafe(events.put_nowait, event)

    job.emit = emit
    rid, created = schemas.new_id(prefix), schemas.now()
    record = {"id": rid, "method": "POST", "path": request.url.path, "model": model_id, "stream": body.stream}
    try:
        worker.submit(job)
    except QueueFullError as exc:
        raise APIError(
            429, str(exc), kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
        ) from None
    except ShuttingDownError as exc:
        raise APIError(503, str(exc), kind="server_error", code="shutting_down") from None
    request.scope["llamactl.job"] = True  # logged when the worker is done with it, not by the front door
    finish = _Finish(job, events, record, log)
    answer = _Answer(rid, model_id, created, chat=prefix == "chatcmpl")
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return _JobStream(_sse(answer, finish.events(request), include_usage), finish)
    pieces: list[str] = []
    done: Finished | Failed | None = None
    async for event in finish.events(request):
        if isinstance(event, Piece):
            pieces.append(event.text)
        else:
            done = event
    if isinstance(done, Failed):
        raise APIError(500, done.message, kind="server_error")
    if done is None or done.finish_reason == "cancelled":
        raise APIError(503, "the request was cancelled: the server is shutting down", kind="server_error")
    return JSONResponse(answer.whole("".join(pieces), done))


@dataclass
class _Answer:
    """Builds the response objects of one request (chat or text completion)."""

    rid: str
    model: str
    created: int
    chat: bool

    def whole(self, text: str, done: Finished) -> dict[str, Any]:
        use = _usage(done)
        if self.chat:
            return schemas.chat_completion(self.rid, self.model, self.created, text, done.finish_reason, use)
        return schemas.text_completion(self.rid, self.model, self.created, text, done.finish_reason, use)

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            return schemas.chat_chunk(self.rid, self.model, self.created, delta, finish_reason)
        return schemas.text_completion(self.rid, self.model, self.created, text or "", finish_reason, None)

    def usage_chunk(self, done: Finished) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return schemas.usage_chunk(self.rid, self.model, self.created, obj, _usage(done))


def _usage(done: Finished) -> dict[str, Any]:
    return schemas.usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens)


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _sse(answer: _Answer, events: AsyncIterator[Event], include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk, content chunks, a finish_reason chunk, (usage), `data: [DONE]`."""
    if answer.chat:
        yield _data(answer.chunk(None, first=True))
    async for event in events:
        if isinstance(event, Piece):
            yield _data(answer.chunk(event.text))
        elif isinstance(event, Failed):
            yield _data(schemas.error_body(event.message, "server_error"))
        elif event.finish_reason == "cancelled":
            yield _data(schemas.error_body("the request was cancelled: the server is shutting down", "server_error"))
        else:
            yield _data(answer.chunk(None, event.finish_reason))
            if include_usage:
                yield _data(answer.usage_chunk(event))
            yield "data: [DONE]\n\n"


class _JobStream(StreamingResponse):
    """A streamed answer that cancels its job however the stream ends.

    Starlette stops sending when the client disconnects by cancelling the sending task, which
    may leave the event generator suspended rather than closed: this makes the cancel certain.
    """

    def __init__(self, content: AsyncIterator[str], finish: _Finish) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.finish = finish

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.finish.abandon()


_BACKGROUND: set[asyncio.Task[None]] = set()


class _Finish:
    """A job's events for the response, and its log line once the worker is done with it.

    When the response stops listening early (the client went away), the job is cancelled at
    once and a background task waits for the worker's final event to log the request.
    """

    def __init__(self, job: Job, queue: asyncio.Queue[Event], record: dict[str, Any], log: LogSink | None) -> None:
        self.job, self.queue, self.record, self.log = job, queue, record, log
        self.finished = self.abandoned = False

    def abandon(self) -> None:
        """The answer stopped being sent before its end: cancel the job; log it once the worker is done."""
        if self.finished or self.abandoned:
            return
        self.abandoned = True
        self.job.cancel()
        self.record["client_gone"] = True
        task = asyncio.get_running_loop().create_task(self._log_when_done())
        _BACKGROUND.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(_BACKGROUND.discard)

    async def events(self, request: Request) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(self.queue.get(), POLL_S)
                except TimeoutError:
                    event = None
                if loop.time() - checked >= POLL_S:  # also while pieces keep coming (a whole answer)
                    checked = loop.time()
                    if await request.is_disconnected():
                        return
                if event is None:
                    continue
                if not isinstance(event, Piece):
                    self.finished = True
                    self._log(event)
                yield event
                if self.finished:
                    return
        finally:
            self.abandon()

    async def _log_when_done(self) -> None:
        while isinstance(event := await self.queue.get(), Piece):
            pass
        self._log(event)

    def _log(self, event: Finished | Failed) -> None:
        if self.log is None:
            return
        record = dict(self.record)
        if isinstance(event, Failed):
            record |= {"status": 500, "error": event.message}
        else:
            record |= {
                "status": 499 if self.abandoned else 200,  # nginx's "client closed request"
                "tokens_in": event.prompt_tokens,
                "tokens_cached": event.cached_tokens,
                "tokens_out": event.completion_tokens,
                "time_to_first_token_s": _round(event.ttft),
                "tokens_per_second": _round(event.tokens_per_second, 2),
                "queued_s": _round(event.queued_s),
                "seconds": _round(event.seconds),
                "finish_reason": event.finish_reason,
                "seed": event.seed,
            }
        self.log(record)


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)
