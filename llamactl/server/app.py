"""The ASGI app: OpenAI's /v1/models, /v1/chat/completions and /v1/completions, and /health.

Every error a client can cause is a JSON error object in OpenAI's shape with a 4xx status:
401 (API key), 404 (unknown model or path), 400 (bad JSON, bad field, a prompt over the
context, a dialog that breaks the template's rules), 413 (body too large), 429 (queue full),
503 (shutting down). Requests for one model run one at a time on its `ModelWorker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamactl.errors import LlamactlError
from llamactl.sampling import SamplingParams
from llamactl.server import schemas
from llamactl.server.schemas import ChatRequest, CompletionRequest
from llamactl.server.worker import (
    Event,
    Failed,
    Finished,
    Job,
    ModelWorker,
    Piece,
    QueueFullError,
    ShuttingDownError,
)
from llamactl.templates import ChatTemplate, Dialog, parse_dialog, validate_dialog
from llamactl.tokenizer import Tokenizer

LogSink = Callable[[dict[str, Any]], None]
POLL_S = 0.1  # how often a waiting non-streamed request checks that its client is still there


class APIError(Exception):
    """An error answered as OpenAI's error object with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        body = schemas.error_body(self.message, self.kind, self.code, self.param)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class ServedModel:
    """A model as the API offers it: its id, worker, tokenizer, chat template and request defaults.

    `defaults` fills what a request leaves out (temperature, top_p, top_k, seed, and
    `max_new_tokens` for max_tokens); `aliases` are other names a request may use.
    """

    id: str
    worker: ModelWorker
    tokenizer: Tokenizer
    template: ChatTemplate
    defaults: SamplingParams = field(default_factory=SamplingParams)
    aliases: tuple[str, ...] = ()
    created: int = field(default_factory=schemas.now)


@dataclass
class ServerSettings:
    """`api_key`: required as a Bearer token on /v1 (None: open); `log`: receives one record per request."""

    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    log: LogSink | None = None


class Models:
    """The served models by id (and alias); `find` is the 404 for a name no model has."""

    def __init__(self, models: Sequence[ServedModel]) -> None:
        self.all = list(models)
        self._by_name = {name: m for m in self.all for name in (m.id, *m.aliases)}
        self.stopping = False

    def find(self, name: str) -> ServedModel:
        if name not in self._by_name:
            served = ", ".join(m.id for m in self.all)
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server has: {served}",
                code="model_not_found",
                param="model",
            )
        return self._by_name[name]

    def stop(self) -> int:
        """Refuse new requests and cancel the queued and running ones (SIGINT/SIGTERM)."""
        self.stopping = True
        return sum(m.worker.cancel_all() for m in self.all)

    def close(self) -> None:
        for m in self.all:
            m.worker.close()


# ---------------------------------------------------------------------------------- front door


class FrontDoor:
    """Pure ASGI middleware in front of the app: the API key, the body bound, the request log.

    The body is read here, up to the bound, before the app sees any of it, so an oversized
    body is a 413 however it is sent (Content-Length or chunked) and never held whole.
    """

    def __init__(self, app: ASGIApp, settings: ServerSettings, models: Models) -> None:
        self.app, self.settings, self.models = app, settings, models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: dict[str, int] = {}
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._gate(scope, receive, send_status)
        finally:
            if self.settings.log is not None and not scope.get("llamactl.job"):
                self._log_plain(scope, status.get("code"), time.perf_counter() - started)

    async def _gate(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.settings.api_key is not None and scope["path"].startswith("/v1") and not self._authorized(scope):
            error = APIError(
                401, "missing or incorrect API key: send Authorization: Bearer KEY", code="invalid_api_key"
            )
            error.headers = {"WWW-Authenticate": "Bearer"}
            await _answer(error, scope, receive, send)
            return
        limit = self.settings.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _answer(_too_large(limit), scope, receive, send)
            return
        body = bytearray()
        more = scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await _answer(_too_large(limit), scope, receive, send)
                return
        await self.app(scope, _replay(bytes(body), receive), send)

    def _authorized(self, scope: Scope) -> bool:
        assert self.settings.api_key is not None
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        expected = self.settings.api_key.encode()
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected)

    def _log_plain(self, scope: Scope, status: int | None, seconds: float) -> None:
        if scope["path"] == "/health" and status == 200:
            return  # health probes every second would drown the log
        record: dict[str, Any] = {"method": scope["method"], "path": scope["path"], "status": status}
        if "llamactl.error" in scope:
            record["error"] = scope["llamactl.error"]
        record["seconds"] = round(seconds, 4)
        assert self.settings.log is not None
        self.settings.log(record)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body over the limit of {limit} bytes", code="request_too_large")


async def _answer(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    scope["llamactl.error"] = error.message
    await error.response()(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body read already, then the real messages (disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# ---------------------------------------------------------------------------------- the app


def create_app(models: Sequence[ServedModel], settings: ServerSettings | None = None) -> FrontDoor:
    """The ASGI app serving `models` (each with its own worker) under `settings`.

    `app.models.stop()` cancels everything in flight (the CLI calls it on SIGINT/SIGTERM);
    the workers are closed when the app's lifespan ends.
    """
    settings = settings or ServerSettings()
    registry = Models(models)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        registry.stop()
        await asyncio.get_running_loop().run_in_executor(None, registry.close)

    api = FastAPI(title="llamactl", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    _install_error_handlers(api)

    @api.get("/health")
    async def health() -> JSONResponse:
        if registry.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503)
        pending = {m.id: m.worker.pending for m in registry.all}
        return JSONResponse({"status": "ok", "models": [m.id for m in registry.all], "pending": pending})

    @api.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [schemas.model_card(m.id, m.created) for m in registry.all]}

    @api.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        served = registry.find(name)
        return schemas.model_card(served.id, served.created)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        served = registry.find(body.model)
        _refuse_unsupported(body, ("tools", "functions", "response_format", "logprobs", "top_logprobs"))
        dialog = _dialog(body)
        try:
            validate_dialog(dialog, pending=True, source="messages")
            # off the event loop: a long prompt takes a while to tokenize, and other clients are streaming
            prompt = await run_in_threadpool(served.template.encode, served.tokenizer, dialog)
        except LlamactlError as exc:
            raise APIError(400, str(exc), param="messages") from None
        job = _job(served, body, prompt, continuation=False, what="messages")
        return await _respond(request, registry, served, job, body, "chatcmpl", settings.log)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        served = registry.find(body.model)
        _refuse_unsupported(body, ("best_of",))
        if body.echo or body.logprobs is not None or body.suffix is not None:
            raise APIError(400, "echo, logprobs and suffix are not supported", param="echo")
        prompt = await run_in_threadpool(_completion_ids, served, body.prompt)
        job = _job(served, body, prompt, continuation=True, what="prompt")
        return await _respond(request, registry, served, job, body, "cmpl", settings.log)

    return FrontDoor(api, settings, registry)


def _install_error_handlers(api: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        request.scope["llamactl.error"] = exc.message
        return exc.response()

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
        if kind != "application/json" and not kind.endswith("+json"):  # `curl -d` sends a form type
            return await api_error(
                request, APIError(400, f"the request body must be JSON (Content-Type: application/json), not {kind}")
            )
        return await api_error(request, _validation_error(exc))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return await api_error(request, APIError(exc.status_code, f"{request.url.path}: {exc.detail}", code=code))

    api.add_exception_handler(APIError, api_error)
    api.add_exception_handler(RequestValidationError, invalid)
    api.add_exception_handler(StarletteHTTPException, http_error)


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first problem pydantic found, worded with the field it is in."""
    first = exc.errors()[0]
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        why = first.get("ctx", {}).get("error", "not JSON")
        return APIError(400, f"the request body is not valid JSON: {why}", code="invalid_json")
    if not where:
        return APIError(400, f"the request body must be a JSON object: {first.get('msg')}")
    field_name = ".".join(where)
    return APIError(400, f"{field_name}: {first.get('msg')}", param=field_name)


def _refuse_unsupported(body: schemas._Request, names: Sequence[str]) -> None:
    if body.n != 1:
        raise APIError(400, f"n={body.n}: only one choice per request is supported", param="n")
    extra = body.model_extra or {}
    for name in names:
        if extra.get(name) not in (None, False, [], {}):
            raise APIError(400, f"{name} is not supported by this server", param=name)


def _dialog(body: ChatRequest) -> Dialog:
    """The request's messages as a dialog; OpenAI's `developer` role is the system prompt."""
    messages = []
    for index, message in enumerate(body.messages):
        text = message.text()
        if text is None:
            raise APIError(400, f"messages.{index}.content: a text content is required", param=f"messages.{index}")
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": text})
    try:
        return parse_dialog(messages, "messages")
    except LlamactlError as exc:
        raise APIError(400, str(exc), param="messages") from None


def _completion_ids(served: ServedModel, prompt: str | list[str] | list[int]) -> list[int]:
    """A text prompt after a BOS id (Meta's text_completion), or token ids as given."""
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise APIError(400, f"prompt: one prompt per request is supported, got {len(prompt)}", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return served.tokenizer.encode(prompt, bos=True)
    try:
        ids = served.tokenizer.check_ids(prompt, "prompt")
    except LlamactlError as exc:
        raise APIError(400, str(exc), param="prompt") from None
    if not ids:
        raise APIError(400, "prompt: no tokens", param="prompt")
    return ids


def _job(
    served: ServedModel,
    body: ChatRequest | CompletionRequest,
    prompt: list[int],
    continuation: bool,
    what: str,
) -> Job:
    """The job for a request once its prompt and answer are known to fit the context."""
    context, asked = served.worker.context, body.max_new()
    if len(prompt) >= context:
        raise APIError(
            400,
            f"this model's maximum context length is {context} tokens, and the {what} take {len(prompt)} "
            "tokens, which leaves no room for an answer",
            code="context_length_exceeded",
            param=what,
        )
    if asked is not None and len(prompt) + asked > context:
        raise APIError(
            400,
            f"this model's maximum context length is {context} tokens; you asked for {len(prompt) + asked} "
            f"({len(prompt)} in the {what}, {asked} in the completion)",
            code="context_length_exceeded",
            param="max_tokens",
        )
    default = served.defaults
    if asked is None and default.max_new_tokens is not None:
        asked = min(default.max_new_tokens, context - len(prompt))
    sampling = SamplingParams(
        temperature=default.temperature if body.temperature is None else body.temperature,
        top_p=default.top_p if body.top_p is None else body.top_p,
        top_k=default.top_k if body.top_k is None else body.top_k,
        seed=default.seed if body.seed is None else body.seed,
        max_new_tokens=asked,
    )
    try:
        sampling.validate()
    except LlamactlError as exc:
        raise APIError(400, str(exc)) from None
    return Job(prompt, sampling, emit=_no_listener, stops=body.stops(), continuation=continuation)


def _no_listener(event: Event) -> None:
    raise AssertionError("a job was submitted before its listener was attached")


async def _respond(
    request: Request,
    registry: Models,
    served: ServedModel,
    job: Job,
    body: ChatRequest | CompletionRequest,
    prefix: str,
    log: LogSink | None,
) -> Any:
    """Queue `job` and answer: a JSON body, or server-sent events when `stream` is set."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:  # called on the worker thread
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped
            loop.call_soon_threadsafe(events.put_nowait, event)

    job.emit = emit
    rid, created = schemas.new_id(prefix), schemas.now()
    record = {"id": rid, "method": "POST", "path": request.url.path, "model": served.id, "stream": body.stream}
    if registry.stopping:
        raise APIError(503, "the server is shutting down", kind="server_error", code="shutting_down")
    try:
        served.worker.submit(job)
    except QueueFullError as exc:
        raise APIError(
            429, str(exc), kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
        ) from None
    except ShuttingDownError as exc:
        raise APIError(503, str(exc), kind="server_error", code="shutting_down") from None
    request.scope["llamactl.job"] = True  # logged when the worker is done with it, not by the front door
    finish = _Finish(job, events, record, log)
    answer = _Answer(rid, served.id, created, chat=prefix == "chatcmpl")
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _sse(answer, finish.events(request), include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
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


class _Finish:
    """A job's events for the response, and its log line once the worker is done with it.

    When the response stops listening early (the client went away), the job is cancelled at
    once and a background task waits for the worker's final event to log the request.
    """

    def __init__(self, job: Job, queue: asyncio.Queue[Event], record: dict[str, Any], log: LogSink | None) -> None:
        self.job, self.queue, self.record, self.log = job, queue, record, log

    async def events(self, request: Request) -> AsyncIterator[Event]:
        finished = False
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
                    finished = True
                    self._log(event)
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.job.cancel()
                self.record["client_gone"] = True
                asyncio.get_running_loop().create_task(self._log_when_done())

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
                "status": 200,
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
