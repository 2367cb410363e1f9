"""Ollama's API (its docs/api.md), served on the second listener (`MYLLM_OLLAMA_PORT`), so
Ollama's own clients, LangChain's `ChatOllama` and the editors' "Ollama" settings work
unchanged. Like every adapter it only translates: requests to runtime calls, events to
Ollama's NDJSON objects, errors to `{"error": "..."}` with Ollama's status codes.

Model management (tags, show, ps, pull, create, blobs, copy, delete) is in
`api/ollama_manage.py`; generation and embeddings are here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from myllm.api.errors import ApiError

OLLAMA_VERSION = "0.12.0"
"""The Ollama release whose API this listener follows (clients compare it to their minimum)."""
OPEN_PATHS = frozenset({"/", "/api/version"})
"""What Ollama clients probe before anything else; open even with API keys, as `/health` is."""

router = APIRouter()


def ollama_renderer(err: ApiError) -> Response:
    """Ollama's error shape: `{"error": "..."}`; a validation problem is a 400, as Ollama answers."""
    return JSONResponse({"error": err.message}, status_code=400 if err.status == 422 else err.status)


def ndjson(objects: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """One JSON object per line, flushed per object: Ollama's streaming format."""

    async def lines() -> AsyncIterator[str]:
        async for obj in objects:
            yield json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/")
@router.head("/")
async def root() -> PlainTextResponse:
    return PlainTextResponse("Ollama is running")


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_VERSION}
