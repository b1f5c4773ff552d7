"""The ASGI app: OpenAI's /v1/models, /v1/chat/completions and /v1/completions, and /health.

Every error a client can cause is a JSON error object in OpenAI's shape with a 4xx status:
401 (API key), 404 (unknown model or path), 400 (bad JSON, bad field, a prompt over the
context, a dialog that breaks the template's rules), 413 (body too large), 429 (queue full),
503 (shutting down). Requests for one model run one at a time on its `ModelWorker`; this
module turns a request into that worker's job (`respond.py` answers it, `front.py` guards it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamactl.errors import LlamactlError
from llamactl.sampling import SamplingParams
from llamactl.server import schemas
from llamactl.server.front import FrontDoor, ServerSettings
from llamactl.server.respond import respond
from llamactl.server.schemas import APIError, ChatRequest, CompletionRequest
from llamactl.server.worker import Event, Job, ModelWorker
from llamactl.templates import ChatTemplate, Dialog, parse_dialog, validate_dialog
from llamactl.tokenizer import Tokenizer

__all__ = ["APIError", "FrontDoor", "Models", "ServedModel", "ServerSettings", "create_app"]


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
        return await respond(request, served.worker, served.id, job, body, "chatcmpl", settings.log)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        served = registry.find(body.model)
        _refuse_unsupported(body, ("best_of",))
        if body.echo or body.logprobs is not None or body.suffix is not None:
            raise APIError(400, "echo, logprobs and suffix are not supported", param="echo")
        prompt = await run_in_threadpool(_completion_ids, served, body.prompt)
        job = _job(served, body, prompt, continuation=True, what="prompt")
        return await respond(request, served.worker, served.id, job, body, "cmpl", settings.log)

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
