"""Streamed answers' framing, flushed per frame: Server-Sent Events, and NDJSON (one JSON object a
line, Ollama's way)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _text(obj: Any) -> str:
    """A string as it is, anything else as compact JSON."""
    return obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


LINE_BREAK = re.compile(r"\r\n|\r|\n")
"""Every line terminator the SSE spec knows (CRLF, a lone CR, LF): a text split on "\\n" alone
keeps its bare CRs, which a standard parser reads as line ends, so model output could forge
`event:` and `data:` lines."""


def _data_lines(obj: Any) -> str:
    """`data:` lines carrying `obj` (a parser joins them back with "\\n")."""
    return "".join(f"data: {line}\n" for line in LINE_BREAK.split(_text(obj)))


def data(obj: Any) -> str:
    return f"{_data_lines(obj)}\n"


def event(name: str, payload: Any) -> str:
    return f"event: {name}\n{_data_lines(payload)}\n"


def pieces(text: str, size: int = 16) -> list[str]:
    """A text (a tool call's JSON arguments) in the pieces a stream sends it in."""
    return [text[i : i + size] for i in range(0, len(text), size)]


def response(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)


def line(obj: Any) -> str:
    """One NDJSON line: `obj` as compact JSON."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def ndjson(lines: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(lines, media_type="application/x-ndjson")


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
