"""Anthropic's Messages API (`/v1/messages`) on the main listener: a message request becomes
one `Runtime.chat` call, its events become a `Message` or Anthropic's stream events. Errors
take Anthropic's shape (`anthropic_renderer`), never FastAPI's 422. A thinking model's thinking
(the events' `thinking`) is a `thinking` block before the text."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from myllm.api.anthropic.conversation import messages_of
from myllm.api.anthropic.models import (
    CountTokensRequest,
    ErrorResponse,
    Message,
    MessagesRequest,
    NamedChoice,
    NoneChoice,
    StopReason,
    TextBlock,
    ThinkingBlock,
    ThinkingConfig,
    ThinkingDisabled,
    ThinkingEnabled,
    TokenCount,
    ToolChoice,
    ToolUseBlock,
    Usage,
)
from myllm.api.http import sse
from myllm.api.http.auth import reloading_key
from myllm.api.http.errors import ApiError
from myllm.api.http.relay import Frames, collect, relay
from myllm.api.state import services
from myllm.errors import InvalidOptions, Overloaded
from myllm.registry.schema import ModelRow
from myllm.runtime.request.template import Think, check_think
from myllm.runtime.request.tools import Call
from myllm.runtime.service import DoneEvent, GenerationOptions, GenerationStream, TokenEvent

PREFIX = "/v1/messages"
OVERLOADED = 529
"""Anthropic's status for a service too busy to take the request; its SDKs retry it."""
router = APIRouter(prefix=PREFIX, tags=["Anthropic"],
                   responses={c: {"model": ErrorResponse} for c in (400, 401, 404, 500, 503, OVERLOADED)})

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          429: "rate_limit_error",
          405: "invalid_request_error", 413: "request_too_large", 503: "overloaded_error", OVERLOADED: "overloaded_error"}


def anthropic_error(err: ApiError) -> tuple[int, dict[str, Any]]:
    """The status and body Anthropic would answer: a full queue is its 529; a model that
    does not fit memory yet, or a daemon stopping, keeps its 503."""
    status = OVERLOADED if isinstance(err.error, Overloaded) else err.status
    return status, {"type": "error", "error": {"type": _TYPES.get(status, "api_error"), "message": err.message}}


def anthropic_renderer(err: ApiError) -> Response:
    status, body = anthropic_error(err)
    return JSONResponse(body, status_code=status)


# -- the request, as the runtime's arguments ---------------------------------------------------


def _tools(body: CountTokensRequest) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                              "parameters": t.input_schema.model_dump()}}
            for t in body.tools or []]


def _tool_choice(choice: ToolChoice | None) -> tuple[str, bool]:
    """The runtime's `tool_choice` (`any` is `required`, a tool its name) and whether calls
    may come several at once."""
    if choice is None:
        return "auto", True
    if isinstance(choice, NoneChoice):
        return "none", True
    name = choice.name if isinstance(choice, NamedChoice) else {"auto": "auto", "any": "required"}[choice.type]
    return name, not choice.disable_parallel_tool_use


def _think(thinking: ThinkingConfig | None) -> Think:
    """The runtime's `think`: `enabled` on, `disabled` off, absent or `adaptive` the model's default."""
    if isinstance(thinking, ThinkingEnabled):
        return True
    return False if isinstance(thinking, ThinkingDisabled) else None


async def _model(request: Request, name: str, thinking: ThinkingConfig | None) -> ModelRow:
    """The model's row; thinking asked of a model whose template cannot think is refused, as
    Anthropic refuses it for its models without thinking."""
    row = await services(request).runtime.model(name)
    check_think(row, _think(thinking), "thinking")
    return row


def _options(body: MessagesRequest) -> GenerationOptions:
    """The sampling options; `budget_tokens` is the thinking budget, which Anthropic requires
    below `max_tokens` (thinking counts toward it) but here has no minimum of 1,024."""
    budget = body.thinking.budget_tokens if isinstance(body.thinking, ThinkingEnabled) else None
    if budget is not None and budget >= body.max_tokens:
        raise InvalidOptions(f"thinking.budget_tokens ({budget}) must be less than max_tokens ({body.max_tokens})",
                             field="thinking.budget_tokens")
    return GenerationOptions.parse({"max_tokens": body.max_tokens, "stop": body.stop_sequences,
                                    "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                                    "thinking_budget": budget})


# -- the answer ----------------------------------------------------------------------------------


def _signature(thinking: str) -> str:
    """A thinking block's signature: the digest of its text. Opaque to clients, which send the
    block back; never checked, since earlier thinking is not part of a prompt."""
    return hashlib.sha256(thinking.encode()).hexdigest()


def _tool_id(call: Call) -> str:
    """Anthropic's ids start `toolu_`; the runtime's call ids are `call_<hex>`."""
    return "toolu_" + call.id.removeprefix("call_")


def _stop(done: DoneEvent, stop_sequences: list[str] | None) -> tuple[StopReason, str | None]:
    """Why the reply ended; `stop_sequence` only for the caller's own sequences (the template's
    end-of-turn text is the end of the turn)."""
    if done.finish_reason == "tool_calls":
        return "tool_use", None
    if done.finish_reason == "length":
        return "max_tokens", None
    if done.stop_sequence is not None and done.stop_sequence in (stop_sequences or ()):
        return "stop_sequence", done.stop_sequence
    return "end_turn", None


def _usage(done: DoneEvent) -> Usage:
    return Usage(input_tokens=done.prompt_eval_tokens, output_tokens=done.completion_tokens,
                 cache_read_input_tokens=done.prompt_tokens - done.prompt_eval_tokens)


@router.post("", response_model=Message, responses=sse.STREAM_DOC)
async def create_message(body: MessagesRequest, request: Request) -> Response | Message:
    messages, prefill = messages_of(body.system, body.messages)
    choice, parallel = _tool_choice(body.tool_choice)
    options = _options(body)
    row = await _model(request, body.model, body.thinking)
    stream = await services(request).runtime.chat(row, messages, options, prefill=prefill, tools=_tools(body),
                                                  tool_choice=choice, parallel_tool_calls=parallel,
                                                  think=_think(body.thinking), caller=reloading_key(request))
    message_id = f"msg_{uuid.uuid4().hex}"
    if body.stream:
        return relay(request, stream, _MessageFrames(stream, message_id, body.stop_sequences))
    done = await collect(request, stream)
    content: list[ThinkingBlock | TextBlock | ToolUseBlock] = []
    if done.thinking:
        content.append(ThinkingBlock(thinking=done.thinking, signature=_signature(done.thinking)))
    if done.text:
        content.append(TextBlock(text=done.text))
    content += [ToolUseBlock(id=_tool_id(c), name=c.name, input=c.arguments) for c in stream.tool_calls]
    reason, sequence = _stop(done, body.stop_sequences)
    return Message(id=message_id, model=stream.model, content=content, stop_reason=reason, stop_sequence=sequence,
                   usage=_usage(done))


def _event(payload: dict[str, Any]) -> str:
    return sse.event(payload["type"], payload)


class _MessageFrames(Frames):
    """message_start; a thinking block while thinking comes (`thinking_delta`s, then its
    `signature_delta`), a text block while text comes; at the end a block per tool call (its
    input in `input_json_delta` pieces), message_delta with the stop reason and usage,
    message_stop. A failure after the start is an `error` event."""

    def __init__(self, stream: GenerationStream, message_id: str, stop_sequences: list[str] | None) -> None:
        self.stream, self.message_id, self.stop_sequences = stream, message_id, stop_sequences
        self.index = 0
        """The content block being written, or the next one."""
        self.open: Literal["thinking", "text"] | None = None
        """The kind of the block being written, if one is."""
        self.thinking: list[str] = []
        """The thinking's pieces so far, for its signature."""

    def start(self, stream: GenerationStream) -> Iterator[str]:
        yield _event({"type": "message_start", "message": {
            "id": self.message_id, "type": "message", "role": "assistant", "model": stream.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": stream.prompt_tokens, "output_tokens": 0}}})

    def token(self, event: TokenEvent) -> Iterator[str]:
        if event.thinking:
            if self.open != "thinking":
                self.open = "thinking"
                yield _event({"type": "content_block_start", "index": self.index,
                              "content_block": {"type": "thinking", "thinking": "", "signature": ""}})
            self.thinking.append(event.thinking)
            yield _event({"type": "content_block_delta", "index": self.index,
                          "delta": {"type": "thinking_delta", "thinking": event.thinking}})
        if event.text:
            if self.open != "text":
                yield from self._close()
                self.open = "text"
                yield _event({"type": "content_block_start", "index": self.index, "content_block": {"type": "text", "text": ""}})
            yield _event({"type": "content_block_delta", "index": self.index, "delta": {"type": "text_delta", "text": event.text}})

    def _close(self) -> Iterator[str]:
        """The end of the block being written: a thinking block's signature comes just before."""
        if self.open == "thinking":
            yield _event({"type": "content_block_delta", "index": self.index,
                          "delta": {"type": "signature_delta", "signature": _signature("".join(self.thinking))}})
        if self.open is not None:
            yield _event({"type": "content_block_stop", "index": self.index})
            self.index += 1
            self.open = None

    def done(self, done: DoneEvent) -> Iterator[str]:
        yield from self._close()
        for call in self.stream.tool_calls:
            yield _event({"type": "content_block_start", "index": self.index, "content_block": {
                "type": "tool_use", "id": _tool_id(call), "name": call.name, "input": {}}})
            for piece in sse.pieces(json.dumps(call.arguments, ensure_ascii=False)):
                yield _event({"type": "content_block_delta", "index": self.index,
                              "delta": {"type": "input_json_delta", "partial_json": piece}})
            yield _event({"type": "content_block_stop", "index": self.index})
            self.index += 1
        reason, sequence = _stop(done, self.stop_sequences)
        yield _event({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                      "usage": _usage(done).model_dump()})
        yield _event({"type": "message_stop"})

    def error(self, err: ApiError) -> Iterator[str]:
        yield _event(anthropic_error(err)[1])


@router.post("/count_tokens", response_model=TokenCount)
async def count_tokens(body: CountTokensRequest, request: Request) -> TokenCount:
    messages, prefill = messages_of(body.system, body.messages)
    choice, _ = _tool_choice(body.tool_choice)
    row = await _model(request, body.model, body.thinking)
    runtime, think, caller = services(request).runtime, _think(body.thinking), reloading_key(request)
    return TokenCount(input_tokens=await runtime.count_chat(row, messages, prefill=prefill, tools=_tools(body),
                                                             tool_choice=choice, think=think, caller=caller))
