"""Request body size limit: larger bodies get 413 in the route's own error shape before they
are read whole into memory."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from myllm.api.http.errors import ApiError, ErrorRouter
from myllm.api.http.middleware import HttpMiddleware


class _TooLarge(BaseException):
    """A BaseException so the framework's body parsing (which turns any Exception into 400)
    lets it reach this middleware."""


class BodyLimitMiddleware(HttpMiddleware):
    def __init__(self, app: ASGIApp, max_body: int, errors: ErrorRouter, unlimited: tuple[str, ...] = ()) -> None:
        """`unlimited`: path prefixes whose routes stream their body to disk as it comes (blob
        uploads of multi-GB model files), never holding it in memory, so no limit applies."""
        super().__init__(app)
        self.max_body = max_body
        self.errors = errors
        self.unlimited = unlimited

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"].startswith(self.unlimited):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await self._reject(scope, receive, send)
            return
        seen = 0
        started = False

        async def counting() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _TooLarge
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting, sending)
        except _TooLarge:
            if not started:
                await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body is larger than the {self.max_body}-byte limit (MYLLM_MAX_BODY)"
        response = self.errors.render(Request(scope), ApiError(413, message, "payload_too_large"))
        await response(scope, receive, send)
