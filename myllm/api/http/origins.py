"""Which web pages may drive the daemon. CORS only decides whether a page may *read* an answer;
a page can still *send* a POST without asking first (a "simple" request: no body, or a
`text/plain`, form or multipart body, no custom header), so with keys off (the default) any
site the user visits could unload models, load others or upload blobs. Browsers name the
sending page in `Origin` on every cross-origin request that is not a GET or HEAD, so a request
that changes anything is refused (403 in the route's shape) when it comes from a page that is
not one of the allowed origins (`MYLLM_ORIGINS`, default the local ones) nor the daemon's own
page. Clients that are not browsers (curl, the Ollama and OpenAI libraries) send no `Origin`
and pass, whatever their content type."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from myllm.api.http.errors import ApiError, ErrorRouter
from myllm.api.http.middleware import HttpMiddleware
from myllm.settings import Settings

LOCAL_ORIGINS = r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods no route changes anything with (an OPTIONS is a CORS preflight)."""
OWN_SITE = frozenset({"same-origin", "none"})
"""`Sec-Fetch-Site` values of a request the daemon's own page (or the user, typing) sent."""


@dataclass(frozen=True)
class Origins:
    """The origins browsers may call from: a list (`MYLLM_ORIGINS`, `*` for any) or, by
    default, the local pattern."""

    listed: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> Origins:
        return cls(tuple(o.strip() for o in (settings.origins or "").split(",") if o.strip()))

    @property
    def pattern(self) -> str | None:
        """The pattern CORS allows when no list is given."""
        return None if self.listed else LOCAL_ORIGINS

    def allows(self, origin: str) -> bool:
        if self.listed:
            return "*" in self.listed or origin in self.listed
        return re.fullmatch(LOCAL_ORIGINS, origin) is not None


def same_origin(origin: str, host: str | None) -> bool:
    """Whether `origin` is the page the daemon served itself: the name and port the request was
    sent to (its `Host`, which the Host allow-list has already checked)."""
    if host is None:
        return False
    try:
        return urlsplit(origin).netloc.lower() == host.strip().lower()
    except ValueError:
        return False


def refusal(method: str, headers: dict[bytes, bytes], origins: Origins) -> str | None:
    """Why a request must not run, as a browser-sent request from another site; None if it may."""
    if method in SAFE_METHODS:
        return None
    origin = headers.get(b"origin")
    if origin is None:
        # No browser sends a cross-site POST without Origin; one that also says where it was
        # sent from (Sec-Fetch-Site) and names another site is refused all the same.
        site = headers.get(b"sec-fetch-site", b"none").decode("latin-1").lower()
        return None if site in OWN_SITE else f"a request sent by a web page of another site ({site}) may not {method} here"
    text = origin.decode("latin-1")
    host = headers.get(b"host")
    if origins.allows(text) or same_origin(text, host.decode("latin-1") if host is not None else None):
        return None
    return (f"a web page of the origin '{text}' may not {method} here; add it to MYLLM_ORIGINS if it is to "
            "drive this server")


class OriginGuardMiddleware(HttpMiddleware):
    def __init__(self, app: ASGIApp, origins: Origins, errors: ErrorRouter) -> None:
        super().__init__(app)
        self.origins = origins
        self.errors = errors

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        reason = refusal(scope["method"], dict(scope["headers"]), self.origins)
        if reason is None:
            await self.app(scope, receive, send)
            return
        await self.errors.render(Request(scope), ApiError(403, reason, "forbidden_origin"))(scope, receive, send)
