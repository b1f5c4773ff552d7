"""The front door: pure ASGI middleware that every request passes before the app sees it.

It checks the API key (401), bounds the body (413) and logs each request that no model
worker logs (errors, /v1/models). The body is read here, up to the bound, so an oversized
body is refused however it is sent (Content-Length or chunked) and never held whole.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamactl.server.schemas import APIError

LogSink = Callable[[dict[str, Any]], None]


@dataclass
class ServerSettings:
    """`api_key`: required as a Bearer token on /v1 (None: open); `log`: receives one record per request."""

    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    log: LogSink | None = None


class FrontDoor:
    """The app behind the API key, the body bound and the request log; `models` is the app's registry."""

    def __init__(self, app: ASGIApp, settings: ServerSettings, models: Any) -> None:
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
            message = "missing or incorrect API key: send Authorization: Bearer KEY"
            error = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
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
