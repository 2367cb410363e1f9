"""Server-Sent Events framing, flushed per event."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def data(obj: Any) -> str:
    payload = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


def event(name: str, payload: str) -> str:
    lines = "".join(f"data: {line}\n" for line in payload.split("\n"))
    return f"event: {name}\n{lines}\n"


def response(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)


EVENT_SCHEMA = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
    "required": ["data"],
    "description": "one Server-Sent Event; `data` holds the API's JSON chunk (or text)",
}
STREAM_DOC: dict[int | str, dict] = {
    200: {"content": {"text/event-stream": {"schema": EVENT_SCHEMA}},
          "description": "JSON, or Server-Sent Events when the request asks to stream"}
}
