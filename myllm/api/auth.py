"""API keys. With keys configured every route but `/health` and the docs needs
`Authorization: Bearer KEY` or `x-api-key: KEY` (the header Anthropic's clients send); a missing
or wrong key gets 401 in the route's own error shape. Keys are compared in constant time and
never logged."""

from __future__ import annotations

import hmac
from pathlib import Path

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from myllm.api.errors import ApiError, ErrorRouter
from myllm.settings import Settings

OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def load_keys(settings: Settings) -> list[bytes]:
    """`MYLLM_API_KEYS` and the lines of `MYLLM_API_KEYS_FILE`. Called once, when the app is
    built: requests never touch the file, so a key added or removed there counts after a restart."""
    keys: list[str] = []
    if settings.api_keys:
        keys += settings.api_keys.get_secret_value().split(",")
    if settings.api_keys_file:
        for line in Path(settings.api_keys_file).expanduser().read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                keys.append(line)
    return [k.strip().encode() for k in keys if k.strip()]


def presented_keys(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The keys a request presents: a Bearer token and an `x-api-key` value, each if sent."""
    found = []
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                found.append(token.strip())
        elif name == b"x-api-key":
            found.append(value.strip())
    return found


def key_matches(presented: bytes, keys: list[bytes]) -> bool:
    """Every key is compared (no early exit), each in constant time."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key)
    return found


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[bytes], errors: ErrorRouter, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.keys = keys
        self.errors = errors
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.keys
            or scope["method"] == "OPTIONS"  # CORS preflights carry no credentials
            or scope["path"] in self.open_paths
        ):
            await self.app(scope, receive, send)
            return
        if any(key_matches(key, self.keys) for key in presented_keys(scope["headers"])):
            await self.app(scope, receive, send)
            return
        message = "missing or invalid API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
        response = self.errors.render(Request(scope), ApiError(401, message, "unauthorized"))
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
