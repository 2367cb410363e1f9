"""Errors to responses, in the shape of the API a request belongs to.

Each API adapter registers one renderer for its path prefixes; every error raised anywhere
(typed domain errors, request validation, unknown routes, bugs) is rendered by it, so no
route answers FastAPI's default 422 shape or a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from myllm.errors import MyLLMError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiError:
    status: int
    message: str
    code: str
    param: str | None = None
    retry_after: int | None = None
    error: MyLLMError | None = None


Renderer = Callable[[ApiError], Response]
INTERNAL = ApiError(500, "internal server error", "internal_error")
"""What a bug is answered with: its text stays in the log."""


def native_renderer(err: ApiError) -> Response:
    """The MyLLM document's shape: `{"detail": "..."}`."""
    return JSONResponse({"detail": err.message}, status_code=err.status)


class ErrorRouter:
    def __init__(self, default: Renderer) -> None:
        self.default = default
        self._routes: list[tuple[str, Renderer]] = []

    def add(self, prefix: str, renderer: Renderer) -> None:
        self._routes.append((prefix, renderer))
        self._routes.sort(key=lambda r: -len(r[0]))

    def render(self, request: Request, err: ApiError) -> Response:
        path = request.url.path
        renderer = next((r for p, r in self._routes if path == p or path.startswith(p.rstrip("/") + "/")), self.default)
        response = renderer(err)
        if err.retry_after is not None:
            response.headers["Retry-After"] = str(err.retry_after)
        return response


def from_domain(exc: MyLLMError) -> ApiError:
    return ApiError(
        status=exc.status,
        message=exc.message,
        code=exc.code,
        param=getattr(exc, "field", None),
        retry_after=getattr(exc, "retry_after", None),
        error=exc,
    )


def in_band(exc: Exception) -> ApiError:
    """An error raised while an answer streams, for the API's in-band error event: a domain
    error as itself, anything else logged with its traceback and answered as `INTERNAL`."""
    if isinstance(exc, MyLLMError):
        return from_domain(exc)
    log.error("stream failed", exc_info=exc)
    return INTERNAL


def describe_validation(exc: RequestValidationError, content_type: str) -> tuple[str, str | None]:
    """One readable line for the first problem, and the field it concerns."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if not field and "json" not in content_type:
        # FastAPI reads a body as JSON only when the request says so (a page cannot then post to
        # this local daemon without a CORS preflight); `curl -d` says form data unless told.
        sent = content_type.split(";")[0] or "no Content-Type"
        return f"the request body must be JSON sent with 'Content-Type: application/json' (got {sent})", None
    msg = first.get("msg", "invalid value")
    return (f"invalid '{field}': {msg}" if field else f"invalid request body: {msg}"), field


def install(app: FastAPI, router: ErrorRouter) -> None:
    app.state.error_router = router

    @app.exception_handler(MyLLMError)
    async def _domain(request: Request, exc: MyLLMError) -> Response:
        return router.render(request, from_domain(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        message, field = describe_validation(exc, request.headers.get("content-type", ""))
        return router.render(request, ApiError(400, message, "invalid_request", param=field))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "http_error")
        return router.render(request, ApiError(exc.status_code, str(exc.detail), code))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return router.render(request, INTERNAL)
