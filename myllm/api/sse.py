"""Server-Sent Events framing, flushed per event."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _text(obj: Any) -> str:
    """A string as it is, anything else as compact JSON."""
    return obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def data(obj: Any) -> str:
    return f"data: {_text(obj)}\n\n"


def event(name: str, payload: Any) -> str:
    lines = "".join(f"data: {line}\n" for line in _text(payload).split("\n"))
    return f"event: {name}\n{lines}\n"


def pieces(text: str, size: int = 16) -> list[str]:
    """A text (a tool call's JSON arguments) in the pieces a stream sends it in."""
    return [text[i : i + size] for i in range(0, len(text), size)]


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
