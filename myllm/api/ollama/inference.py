"""Ollama's API (its docs/api.md), served on the second listener (`MYLLM_OLLAMA_PORT`), so
Ollama's own clients, LangChain's `ChatOllama` and the editors' "Ollama" settings work
unchanged. Like every adapter it only translates: requests to runtime calls, events to
Ollama's NDJSON objects, errors to `{"error": "..."}` with Ollama's status codes.

Model management (tags, show, ps, pull, create, blobs, copy, delete) is in
`api/ollama/manage.py`; generation and embeddings are here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from myllm.api.http import sse
from myllm.api.http.auth import keep_alive_of, reloading_key, require_admin
from myllm.api.http.errors import ApiError, in_band
from myllm.api.http.middleware import HttpMiddleware
from myllm.api.http.relay import Frames, collect, relay
from myllm.api.ollama.models import (
    IGNORED_OPTIONS,
    ChatMessage,
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
)
from myllm.api.state import services
from myllm.errors import InvalidOptions
from myllm.registry.schema import ModelRow
from myllm.runtime.request.durations import parse_duration
from myllm.runtime.request.images import from_base64
from myllm.runtime.request.options import GenerationOptions
from myllm.runtime.request.template import check_think
from myllm.runtime.service import DoneEvent, GenerationStream, TokenEvent

OLLAMA_VERSION = "0.12.0"
"""The Ollama release whose API this listener follows (clients compare it to their minimum)."""
OPEN_PATHS = frozenset({"/", "/api/version"})
"""What Ollama clients probe before anything else; open even with API keys, as `/health` is."""

class JsonByDefaultMiddleware(HttpMiddleware):
    """Ollama reads every request body as JSON whatever its `Content-Type`, and clients rely on
    it: litellm's `ollama/` and `ollama_chat/` providers send none. On this port a body sent
    without one is read as JSON. A web page gains nothing by it: a browser names its page in
    `Origin`, which the origin guard checks on every request that changes anything."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not any(name == b"content-type" for name, _ in scope["headers"]):
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


router = APIRouter()


def ollama_error(err: ApiError) -> dict[str, Any]:
    """Ollama's error shape: `{"error": "..."}`, as an answer's body or as a streamed line."""
    return {"error": err.message}


def ollama_renderer(err: ApiError) -> Response:
    """A validation problem is a 400, as Ollama answers."""
    return JSONResponse(ollama_error(err), status_code=400 if err.status == 422 else err.status)


async def answer(events: AsyncIterator[dict[str, Any]], stream: bool) -> Response:
    """Ollama's status answer (pull, create, a load): NDJSON objects, or with `stream: false` the last one alone.
    The first object is awaited before the answer starts, so work that fails before it gets
    an error status; a later failure is a last `{"error": ...}` line."""
    first = await anext(events)
    if not stream:
        last = first
        async for last in events:
            pass
        return JSONResponse(last)
    return sse.ndjson(_error_as_line(first, events))


async def _error_as_line(first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    yield sse.line(first)
    try:
        async for obj in rest:
            yield sse.line(obj)
    except Exception as exc:
        yield sse.line(ollama_error(in_band(exc)))


@router.get("/")
@router.head("/")
async def root() -> PlainTextResponse:
    return PlainTextResponse("Ollama is running")


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_VERSION}


# -- generation --------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(ms: float) -> int:
    return int(ms * 1_000_000)


def generation_options(options: dict[str, Any] | None, format: str | dict[str, Any] | None) -> GenerationOptions:
    """Ollama's options (its names, `num_predict` included) and `format` as the runtime's."""
    given = {k: v for k, v in (options or {}).items() if k not in IGNORED_OPTIONS}
    if format:
        given["format"] = format
    return GenerationOptions.parse(given)


async def _model_row(request: Request, name: str) -> ModelRow:
    return await services(request).runtime.model(name)


def _images(images: list[str] | None) -> list[bytes]:
    """Ollama's images: base64 text each (the runtime decodes and checks them)."""
    return [from_base64(image) for image in images or []]


def _final(done: DoneEvent, started: float, ready: float) -> dict[str, Any]:
    """The closing object's measurements, in nanoseconds: `load_duration` is the time until the
    model was loaded and the prompt prepared. As in Ollama, `prompt_eval_count` is the whole
    prompt and `prompt_eval_cached_count` (left out when 0) the part whose KV was reused; with
    speculative decoding `draft_count` and `draft_accepted_count` (extensions) its drafted tokens."""
    cached = done.prompt_tokens - done.prompt_eval_tokens
    return {
        "done": True, "done_reason": "length" if done.finish_reason == "length" else "stop",
        "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": int((ready - started) * 1e9),
        "prompt_eval_count": done.prompt_tokens, **({"prompt_eval_cached_count": cached} if cached else {}),
        "prompt_eval_duration": _ns(done.prompt_ms), "eval_count": done.completion_tokens,
        "eval_duration": _ns(done.generation_ms),
        **({"draft_count": done.draft_tokens, "draft_accepted_count": done.draft_accepted} if done.draft_tokens else {}),
    }


async def _load_or_unload(request: Request, row: ModelRow, keep_alive: str | float | None, field: str) -> AsyncIterator[dict[str, Any]]:
    """An empty prompt (or message list) loads the model; with `keep_alive: 0` it unloads it.
    Ollama clients preload models this way."""
    runtime = services(request).runtime
    if keep_alive is not None and parse_duration(keep_alive) == 0:
        require_admin(request, "unloading a model")
        await runtime.unload(row.name)
        reason = "unload"
    else:
        await runtime.load(row.name, keep_alive=keep_alive_of(request, keep_alive), caller=reloading_key(request))
        reason = "load"
    empty: dict[str, Any] = {"message": {"role": "assistant", "content": ""}} if field == "message" else {"response": ""}
    yield {"model": row.name, "created_at": _now(), **empty, "done": True, "done_reason": reason}


Piece = Callable[[str, str], dict[str, Any]]
"""A response object's text fields from a piece of the answer and of the thinking."""


def _chat_piece(text: str, thinking: str) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": text, **({"thinking": thinking} if thinking else {})}}


def _generate_piece(text: str, thinking: str) -> dict[str, Any]:
    return {"response": text, **({"thinking": thinking} if thinking else {})}


async def _respond(
    request: Request, stream: GenerationStream, streaming: bool, piece: Piece, started: float
) -> Response:
    """NDJSON objects as tokens come (each carrying its piece of text), or one object at the end."""
    ready = time.perf_counter()
    if streaming:
        return relay(request, stream, _Lines(stream, piece, started, ready))
    done = await collect(request, stream)
    return JSONResponse({"model": stream.model, "created_at": _now(), **_calls(piece(done.text, done.thinking), stream),
                         **_final(done, started, ready)})


class _Lines(Frames):
    """An object per piece of text, then the closing one with the calls and measurements; after
    the first line, an error is a line of its own, as Ollama sends it."""

    ndjson = True

    def __init__(self, stream: GenerationStream, piece: Piece, started: float, ready: float) -> None:
        self.stream, self.piece, self.started, self.ready = stream, piece, started, ready

    def token(self, event: TokenEvent) -> Iterator[str]:
        if event.text or event.thinking:
            yield sse.line({"model": self.stream.model, "created_at": _now(), **self.piece(event.text, event.thinking),
                            "done": False})

    def done(self, done: DoneEvent) -> Iterator[str]:
        yield sse.line({"model": self.stream.model, "created_at": _now(), **_calls(self.piece("", ""), self.stream),
                        **_final(done, self.started, self.ready)})

    def error(self, err: ApiError) -> Iterator[str]:
        yield sse.line(ollama_error(err))


def _calls(fields: dict[str, Any], stream: GenerationStream) -> dict[str, Any]:
    """The closing message carries the tool calls read from the reply, arguments as objects."""
    if stream.tool_calls and "message" in fields:
        calls = [{"function": {"name": c.name, "arguments": c.arguments}} for c in stream.tool_calls]
        return {**fields, "message": {**fields["message"], "tool_calls": calls}}
    return fields


def _message(m: ChatMessage) -> dict[str, Any]:
    """Ollama's message as chat templates read one: tool calls in OpenAI's shape, a tool
    result's tool under `name`; its images before its text, where Ollama puts them."""
    out: dict[str, Any] = {"role": m.role, "content": [*_images(m.images), m.content] if m.images else m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"type": "function", "function": call.function.model_dump()} for call in m.tool_calls]
    if m.tool_name:
        out["name"] = m.tool_name
    return out


@router.post("/api/chat")
async def chat(body: ChatRequest, request: Request) -> Response:
    started = time.perf_counter()
    row = await _model_row(request, body.model)
    check_think(row, body.think, "think")
    if not body.messages:
        return await answer(_load_or_unload(request, row, body.keep_alive, "message"), body.stream)
    stream = await services(request).runtime.chat(
        row, [_message(m) for m in body.messages], generation_options(body.options, body.format),
        keep_alive=keep_alive_of(request, body.keep_alive), tools=body.tools, think=body.think, caller=reloading_key(request),
    )
    return await _respond(request, stream, body.stream, _chat_piece, started)


@router.post("/api/generate")
async def generate(body: GenerateRequest, request: Request) -> Response:
    started = time.perf_counter()
    row = await _model_row(request, body.model)
    check_think(row, body.think, "think")
    if body.template:
        raise InvalidOptions("a per-request template is not supported (Ollama's are Go templates); "
                             "create a model with its own TEMPLATE instead", field="template")
    if body.suffix:
        raise InvalidOptions(f'"{row.name}" does not support insert', field="suffix")
    if body.context:
        raise InvalidOptions("'context' (the deprecated token list) is not supported; send the conversation to /api/chat",
                             field="context")
    if not body.prompt:
        return await answer(_load_or_unload(request, row, body.keep_alive, "response"), body.stream)
    stream = await services(request).runtime.generate(
        row, body.prompt, generation_options(body.options, body.format), system=body.system, raw=body.raw,
        keep_alive=keep_alive_of(request, body.keep_alive), think=body.think, images=_images(body.images),
        caller=reloading_key(request),
    )
    return await _respond(request, stream, body.stream, _generate_piece, started)


# -- embeddings --------------------------------------------------------------------------------


@router.post("/api/embed")
async def embed(body: EmbedRequest, request: Request) -> dict[str, Any]:
    started = time.perf_counter()
    inputs = ([body.input] if body.input else []) if isinstance(body.input, str) else list(body.input)
    if not inputs:  # as Ollama answers: the model must exist, the list is empty
        row = await services(request).runtime.model(body.model)
        return {"model": row.name, "embeddings": []}
    result = await services(request).runtime.embed(body.model, list(inputs), keep_alive=keep_alive_of(request, body.keep_alive),
                                                   truncate=body.truncate, dimensions=body.dimensions,
                                                   caller=reloading_key(request))
    return {
        "model": result.model, "embeddings": result.vectors, "total_duration": int((time.perf_counter() - started) * 1e9),
        "load_duration": 0, "prompt_eval_count": result.prompt_tokens,
    }


@router.post("/api/embeddings")
async def embeddings(body: EmbeddingsRequest, request: Request) -> dict[str, Any]:
    if not body.prompt:
        return {"embedding": []}
    result = await services(request).runtime.embed(body.model, [body.prompt], keep_alive=keep_alive_of(request, body.keep_alive),
                                                   truncate=True, caller=reloading_key(request))
    return {"embedding": result.vectors[0]}
