"""One log line per request: method, path, status, model, tokens, milliseconds. Every stream a
route answers from is counted with `track(request, stream)`, by the relay that reads it
(api/http/relay.py; `/v1/completions` reads one per prompt); the line is written when the
response (streamed or not) has been sent, so a stream's tokens are counted, and a request's
tokens are those of all its streams."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from myllm.api.http.auth import CALLER
from myllm.api.http.disconnect import CLIENT_GONE
from myllm.api.http.middleware import HttpMiddleware

log = logging.getLogger("myllm.access")
CLIENT_CLOSED = 499
"""What the line says of a request whose client left before its answer (nginx's number)."""


def track(request: Request, stream: Any) -> None:
    """Count `stream` (anything with `model` and, once finished, `done.completion_tokens`)
    in this request's log line."""
    if not hasattr(request.state, "myllm_streams"):
        request.state.myllm_streams = []
    request.state.myllm_streams.append(stream)


def api_of(path: str) -> str:
    """Which API a path of the main listener belongs to (its metrics label)."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1"):
        return "openai"
    if path in ("/load_model", "/generate", "/stream", "/model_status", "/status"):
        return "compat"
    if path.startswith("/llama"):
        return "llama"
    return "native"


def request_fields(scope: Scope, api: str, status: int, started: float) -> dict[str, Any]:
    """What one request's line says, as fields (the JSON log's keys): the route's template, the
    first stream's model, the tokens of all its streams (`-` before any finished), the first
    token's latency as the runner measured it, and the key as a short hash (never the key)."""
    state = scope.get("state", {})
    streams = state.get("myllm_streams", [])
    done = [s.done for s in streams if s.done is not None]
    caller = state.get(CALLER)
    tokens = {
        "prompt_tokens": sum(d.prompt_tokens for d in done), "cached_tokens": sum(d.prompt_tokens - d.prompt_eval_tokens for d in done),
        "completion_tokens": sum(d.completion_tokens for d in done),
    } if done else {"prompt_tokens": None, "cached_tokens": None, "completion_tokens": None}
    return {
        "method": scope["method"], "path": scope["path"], "api": api,
        "route": getattr(scope.get("route"), "path", "unmatched"), "status": status,
        "model": streams[0].model if streams else None, **tokens,
        "ttft_ms": round(done[0].prompt_ms, 1) if done else None,
        "ms": round((time.perf_counter() - started) * 1000, 1),
        "key": caller.key_hash[:8] if caller is not None and caller.key_hash else None,
    }


def _text(fields: dict[str, Any]) -> str:
    def show(value: Any) -> str:
        return "-" if value is None else str(value)

    return (f"{fields['method']} {fields['path']} {fields['status']} model={show(fields['model'])} "
            f"tokens={show(fields['completion_tokens'])} prompt={show(fields['prompt_tokens'])} "
            f"cached={show(fields['cached_tokens'])} ttft={show(fields['ttft_ms'])}ms key={show(fields['key'])} "
            f"api={fields['api']} {fields['ms']}ms")


class AccessLogMiddleware(HttpMiddleware):
    """One line per request, when the response (streamed or not) has been sent. `api` is fixed
    for a listener (`ollama`) or read from the path; `on_request` gets the same fields (the
    metrics count requests from them)."""

    def __init__(self, app: ASGIApp, api: str | None = None,
                 on_request: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__(app)
        self.api = api
        self.on_request = on_request

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
            status = status or (CLIENT_CLOSED if state.get(CLIENT_GONE) else 500)
            fields = request_fields(scope, self.api or api_of(scope["path"]), status, started)
            log.info("%s", _text(fields), extra={"fields": fields})
            if self.on_request is not None:
                self.on_request(fields)
