"""One log line per request: method, path, status, model, tokens, milliseconds. Routes that
generate call `track(request, stream)`; the line is written when the response (streamed or
not) has been sent, so a stream's tokens are counted."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("myllm.access")


def track(request: Request, stream: Any) -> None:
    request.state.myllm_stream = stream


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            stream = scope.get("state", {}).get("myllm_stream")
            done = getattr(stream, "done", None)
            log.info(
                "%s %s %d model=%s tokens=%s %.0fms",
                scope["method"], scope["path"], status or 500,
                getattr(stream, "model", "-"),
                done.completion_tokens if done is not None else "-",
                (time.perf_counter() - started) * 1000,
            )
