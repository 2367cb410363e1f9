"""One log line per request: method, path, status, model, tokens, milliseconds. Routes that
generate call `track(request, stream)` for every stream they start (`/v1/completions` starts
one per prompt); the line is written when the response (streamed or not) has been sent, so a
stream's tokens are counted, and a request's tokens are those of all its streams."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from myllm.api.disconnect import CLIENT_GONE
from myllm.api.middleware import HttpMiddleware

log = logging.getLogger("myllm.access")
CLIENT_CLOSED = 499
"""What the line says of a request whose client left before its answer (nginx's number)."""


def track(request: Request, stream: Any) -> None:
    """Count `stream` (anything with `model` and, once finished, `done.completion_tokens`)
    in this request's log line."""
    if not hasattr(request.state, "myllm_streams"):
        request.state.myllm_streams = []
    request.state.myllm_streams.append(stream)


def _model_and_tokens(streams: list[Any]) -> tuple[str, str]:
    """The first stream's model, and the completion tokens of those that finished ("-" for none)."""
    if not streams:
        return "-", "-"
    done = [s.done for s in streams if s.done is not None]
    return streams[0].model, str(sum(d.completion_tokens for d in done)) if done else "-"


class AccessLogMiddleware(HttpMiddleware):
    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
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
            state = scope.get("state", {})
            model, tokens = _model_and_tokens(state.get("myllm_streams", []))
            status = status or (CLIENT_CLOSED if state.get(CLIENT_GONE) else 500)
            log.info(
                "%s %s %d model=%s tokens=%s %.0fms",
                scope["method"], scope["path"], status, model, tokens,
                (time.perf_counter() - started) * 1000,
            )
