"""The chat page (`GET /ui`): three static files from the package, no build step, nothing
fetched from elsewhere. It talks to the native API like any client; the Content-Security-Policy
allows only its own script and style, so nothing a model writes could run even if it reached
the page as markup (the script puts all text in as text); images are shown from `blob:` object
URLs the script makes of files the user chose and of a session's stored images it fetched."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

router = APIRouter(include_in_schema=False)
FILES = {"/ui": ("index.html", "text/html; charset=utf-8"), "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/ui/app.css": ("app.css", "text/css; charset=utf-8")}
PATHS = frozenset(FILES)
"""Open without a key: the page must load to ask for one."""
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' blob:; "
          "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _file(path: str) -> Response:
    name, media = FILES[path]
    body = resources.files("myllm.api.ui").joinpath("static", name).read_bytes()
    return Response(body, media_type=media, headers={
        "Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


@router.get("/ui")
async def page() -> Response:
    return _file("/ui")


@router.get("/ui/app.js")
async def script() -> Response:
    return _file("/ui/app.js")


@router.get("/ui/app.css")
async def style() -> Response:
    return _file("/ui/app.css")
