"""OpenAI's Responses API (`/v1/responses`): input items to one `Runtime.chat` call, the reply
to output items, stored responses through `ResponseStore` (a chain of responses is a session,
so `previous_response_id` puts the earlier turns first and the runner's KV reuse applies).
A thinking model's thinking is a `reasoning` output item before the message; a chain's turns
keep only the answers, as templates drop earlier thinking. Errors are rendered by the `/v1`
renderer (OpenAI's shape)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from myllm.api.http import sse
from myllm.api.http.auth import reloading_key, viewer
from myllm.api.http.errors import ApiError
from myllm.api.http.relay import Frames, collect, relay
from myllm.api.http.stored_turns import earlier_messages, kept_contents
from myllm.api.openai.models import ErrorObject
from myllm.api.openai.responses_models import Reasoning, ResponseRequest
from myllm.api.state import services
from myllm.errors import InvalidOptions
from myllm.registry.schema import ModelRow
from myllm.registry.session_images import Content, Parts, text_of
from myllm.registry.sessions import NewMessage, StoredMessage
from myllm.runtime.request.images import from_url
from myllm.runtime.request.options import GenerationOptions
from myllm.runtime.request.template import Think, check_think
from myllm.runtime.request.tools import Call, call_text
from myllm.runtime.service import DoneEvent, GenerationStream, TokenEvent

router = APIRouter(prefix="/v1", tags=["OpenAI Responses"],
                   responses={c: {"model": ErrorObject} for c in (400, 401, 403, 404, 429, 500, 503)})


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def _content_of(content: Any, where: str) -> Content:
    """A message's content: a string, or parts: text (`input_text`, `output_text`, `text`), joined
    as they are, and `input_image`s in their places."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidOptions(f"{where}.content must be a string or a list of parts", field="input")
    pieces = [_part(part, f"{where}.content[{j}]") for j, part in enumerate(content)]
    texts = [piece for piece in pieces if isinstance(piece, str)]
    return "".join(texts) if len(texts) == len(pieces) else pieces


def _part(part: Any, where: str) -> str | bytes:
    """A content part as the runtime takes it: a text part's text, an `input_image`'s image (by
    `image_url`; `detail` is the model's own business here, as in llama-server)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
        return str(part["text"])
    if kind == "input_image":
        if part.get("file_id") is not None:
            raise InvalidOptions(f"{where}: an input_image by file_id is not supported (this server has no Files "
                                 "API); send its image_url as a data URI (data:image/png;base64,...)", field="input")
        url = part.get("image_url")
        if not isinstance(url, str):
            raise InvalidOptions(f"{where}.image_url must be a string (a data URI)", field="input")
        return from_url(url, f"{where}.image_url")
    raise InvalidOptions(f"{where}: only text and input_image parts are supported", field="input")


def _items(body: ResponseRequest) -> list[dict[str, Any]]:
    """The new input as the runtime's messages (OpenAI's chat shape, tool calls included)."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    messages: list[dict[str, Any]] = []
    called: dict[str, str] = {}
    for i, item in enumerate(body.input):
        kind = item.get("type", "message")
        where = f"input[{i}]"
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role", ""), item.get("role"))
            if role not in ("system", "user", "assistant"):
                raise InvalidOptions(f"{where}.role must be user, assistant, system or developer", field="input")
            messages.append({"role": role, "content": _content_of(item.get("content"), where)})
        elif kind == "function_call":
            name, call_id, arguments = item.get("name"), item.get("call_id"), item.get("arguments", "{}")
            if not isinstance(name, str) or not isinstance(call_id, str) or not isinstance(arguments, str):
                raise InvalidOptions(f"{where}: a function_call needs name, call_id and arguments (a JSON string)", field="input")
            called[call_id] = name
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                raise InvalidOptions(f"{where}.output must be a string", field="input")
            message = {"role": "tool", "content": output}
            if item.get("call_id") in called:
                message["name"] = called[item["call_id"]]
            messages.append(message)
        elif kind != "reasoning":  # an earlier reply's thinking, sent back: templates drop it
            raise InvalidOptions(
                f"{where}.type {kind!r} is not supported (message, function_call, function_call_output, reasoning)",
                field="input")
    if not messages:
        raise InvalidOptions("input must not be empty", field="input")
    return messages


def _tools(body: ResponseRequest) -> tuple[list[dict[str, Any]] | None, str]:
    """Responses' flat function tools as chat tools, and `tool_choice` as the runtime's."""
    tools = None
    if body.tools:
        tools = []
        for i, tool in enumerate(body.tools):
            if tool.get("type") != "function":
                raise InvalidOptions(f"tools[{i}].type {tool.get('type')!r} is not supported (function)", field="tools")
            fn = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
            tools.append({"type": "function", "function": fn})
    choice = body.tool_choice
    if choice is None:
        return tools, "auto"
    if isinstance(choice, str):
        return tools, choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return tools, choice["name"]
    raise InvalidOptions("tool_choice must be auto, none, required or {'type': 'function', 'name': ...}", field="tool_choice")


def _think(reasoning: Reasoning | None, row: ModelRow) -> Think:
    """`reasoning.effort` as the runtime's `think`: none and minimal turn thinking off (any model
    takes them), a level is passed on (xhigh and max as high, the most a template reads), no
    effort is the model's default. A level asked of a model that cannot think is a 400 naming
    `reasoning.effort`, as OpenAI answers it for its models without reasoning."""
    effort = reasoning.effort if reasoning else None
    if effort is None:
        return None
    if effort in ("none", "minimal"):
        return False
    think = {"xhigh": "high", "max": "high"}.get(effort, effort)
    check_think(row, think, "reasoning.effort")
    return think


def _options(body: ResponseRequest) -> GenerationOptions:
    fmt = (body.text or {}).get("format") or {}
    format_: Any = None
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise InvalidOptions("text.format json_schema needs a schema", field="text")
        format_ = fmt["schema"]
    elif fmt.get("type") == "json_object":
        format_ = "json"
    return GenerationOptions.parse({"max_tokens": body.max_output_tokens, "temperature": body.temperature,
                                    "top_p": body.top_p, "format": format_})


def _status(done: DoneEvent) -> str:
    """The finished response's status: `incomplete` when the token limit cut the reply."""
    return "incomplete" if done.finish_reason == "length" else "completed"


@dataclass(frozen=True)
class _Ids:
    """The ids of a response's reasoning and message items, the same in its stream and its end."""

    reasoning: str
    message: str


def _output(text: str, thinking: str, calls: list[Call], ids: _Ids, status: str) -> list[dict[str, Any]]:
    """The reply as output items: the reasoning (when the model thought), the message, the
    calls, each with its own status: the item being written when the limit cut the reply (the
    last) is `incomplete` like the response, and a reply cut while thinking has no message, as
    OpenAI's; calls are always whole (the runtime returns only complete calls), and a message
    followed by calls was finished before them, so those are `completed`."""
    items: list[dict[str, Any]] = []
    message = bool(text) or not (calls or (thinking and status == "incomplete"))
    if thinking:
        items.append({"type": "reasoning", "id": ids.reasoning, "summary": [],
                      "content": [{"type": "reasoning_text", "text": thinking}],
                      "status": status if not (message or calls) else "completed"})
    if message:
        items.append({"type": "message", "id": ids.message, "status": status if not calls else "completed",
                      "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]})
    for call in calls:
        items.append({"type": "function_call", "id": _new_id("fc"), "call_id": call.id, "name": call.name,
                      "arguments": json.dumps(call.arguments, ensure_ascii=False), "status": "completed"})
    return items


def _usage(done: DoneEvent) -> dict[str, Any]:
    return {"input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "input_tokens_details": {"cached_tokens": done.prompt_tokens - done.prompt_eval_tokens},
            "output_tokens_details": {"reasoning_tokens": done.thinking_tokens}}


def _response(body: ResponseRequest, rid: str, created: int, model: str, status: str,
              output: list[dict[str, Any]], done: DoneEvent | None) -> dict[str, Any]:
    usage = _usage(done) if done is not None else None
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": rid, "object": "response", "created_at": created, "model": model,
        "status": status, "incomplete_details": incomplete, "error": None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "metadata": body.metadata or {},
        "output": output, "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id, "store": body.store,
        "temperature": body.temperature, "top_p": body.top_p, "text": body.text or {"format": {"type": "text"}},
        "tool_choice": body.tool_choice or "auto", "tools": body.tools or [], "usage": usage,
        "reasoning": body.reasoning.model_dump() if body.reasoning else None,
    }


def _turn(new: list[dict[str, Any]], contents: list[Parts], counts: list[int], text: str, calls: list[Call],
          done: DoneEvent) -> list[NewMessage]:
    """The messages a stored response adds to its session: the new input (`contents`: its
    images by digest), then the reply (calls written as the fallback prompt writes them, so a
    later turn shows them to the model) with its thinking apart, which later turns' prompts
    leave out."""
    turn: list[NewMessage] = []
    for message, content, n in zip(new, contents, counts):
        called = "".join(
            call_text(c["function"]["name"], _arguments(c["function"]["arguments"])) for c in message.get("tool_calls", []))
        if called:
            content = content + called if isinstance(content, str) else [*content, called]
        turn.append((message["role"], content, n))
    reply = text + "".join(call_text(c.name, c.arguments) for c in calls)
    turn.append(("assistant", reply, done.completion_tokens, done.thinking or None))
    return turn


def _arguments(text: str) -> Any:
    """A call's arguments as sent (a JSON string), parsed when they parse."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@router.post("/responses", responses=sse.STREAM_DOC)
async def create_response(body: ResponseRequest, request: Request) -> Response:
    svc = services(request)
    new = _items(body)
    tools, choice = _tools(body)
    model = body.model or svc.settings.default_model
    row = await svc.runtime.model(model)
    think = _think(body.reasoning, row)
    stored: list[StoredMessage] = []
    session: str | None = None
    if body.previous_response_id:
        session, stored = await svc.pools.db.run(svc.responses.conversation, body.previous_response_id, viewer(request))
    turn = await svc.turns.acquire(session, "responses", model, viewer(request)) if session else None
    release = turn.release if turn else (lambda: None)
    try:
        system = [{"role": "system", "content": body.instructions}] if body.instructions else []
        stream = await svc.runtime.chat(
            row, system + await earlier_messages(svc, stored, system + new) + new, _options(body),
            tools=tools, tool_choice=choice, parallel_tool_calls=body.parallel_tool_calls is not False,
            think=think, count=[text_of(m["content"]) for m in new], caller=reloading_key(request),
        )
    except BaseException:
        release()
        raise
    rid, created, ids = _new_id("resp"), int(time.time()), _Ids(_new_id("rs"), _new_id("msg"))

    async def finish(done: DoneEvent) -> dict[str, Any]:
        status = _status(done)
        output = _output(done.text, done.thinking, stream.tool_calls, ids, status)
        response = _response(body, rid, created, stream.model, status, output, done)
        if body.store:
            contents = await kept_contents(svc, [m["content"] for m in new])
            await svc.pools.db.run(svc.responses.store, response, body.previous_response_id, stream.model,
                                    _turn(new, contents, stream.counts, done.text, stream.tool_calls, done),
                                    viewer(request), turn and turn.holder)
        return response

    if body.stream:
        shell = _response(body, rid, created, stream.model, "in_progress", [], None)
        return relay(request, stream, _Events(shell, ids, finish), after=release)
    try:
        return JSONResponse(await finish(await collect(request, stream)))
    finally:
        release()


Finish = Callable[[DoneEvent], Awaitable[dict[str, Any]]]
"""The finished response, built and stored."""


@dataclass
class _Streamed:
    """An output item whose one content part streams as deltas: the reasoning item's
    `reasoning_text`, the message's `output_text`."""

    item: dict[str, Any]
    """The item as added: in progress, no content yet."""
    part: dict[str, Any]
    """Its content part as added: no text yet."""
    events: str
    """The prefix of the part's `.delta` and `.done` events."""
    index: int | None = None
    """Its output index once added."""
    text: str = ""


class _Events(Frames):
    """The SDK's event sequence, each with its `sequence_number`: the reasoning item's events
    while the model thinks, then the message's (at the next output index), the calls at the
    end. The last is named after the response's status, as OpenAI's are: `response.completed`,
    or `response.incomplete` when the token limit cut the reply (the SDK's `stream()` helper
    then has no final response, as with OpenAI; iterating `create(stream=True)` sees the event)."""

    def __init__(self, shell: dict[str, Any], ids: _Ids, finish: Finish) -> None:
        self.shell, self.finish = shell, finish
        self.seq = 0
        self.opened = 0
        self.parts = {
            "reasoning": _Streamed({"type": "reasoning", "id": ids.reasoning, "summary": [], "content": [],
                                    "status": "in_progress"},
                                   {"type": "reasoning_text", "text": ""}, "response.reasoning_text"),
            "message": _Streamed({"type": "message", "id": ids.message, "status": "in_progress", "role": "assistant",
                                  "content": []},
                                 {"type": "output_text", "text": "", "annotations": []}, "response.output_text"),
        }
        self.response: dict[str, Any] = {}

    def event(self, kind: str, **fields: Any) -> str:
        self.seq += 1
        return sse.event(kind, json.dumps({"type": kind, "sequence_number": self.seq - 1, **fields}, ensure_ascii=False))

    def start(self, stream: GenerationStream) -> Iterator[str]:
        yield self.event("response.created", response=self.shell)
        yield self.event("response.in_progress", response=self.shell)

    def _open(self, part: _Streamed, index: int) -> Iterator[str]:
        part.index, self.opened = index, index + 1
        yield self.event("response.output_item.added", output_index=index, item=part.item)
        yield self.event("response.content_part.added", item_id=part.item["id"], output_index=index, content_index=0,
                         part=part.part)

    def _delta(self, part: _Streamed, delta: str) -> Iterator[str]:
        if part.index is None:
            yield from self._open(part, self.opened)
        part.text += delta
        yield self.event(f"{part.events}.delta", item_id=part.item["id"], output_index=part.index, content_index=0,
                         delta=delta)

    def token(self, event: TokenEvent) -> Iterator[str]:
        if event.thinking:
            yield from self._delta(self.parts["reasoning"], event.thinking)
        if event.text:
            yield from self._delta(self.parts["message"], event.text)

    async def settle(self, done: DoneEvent) -> None:
        self.response = await self.finish(done)

    def done(self, done: DoneEvent) -> Iterator[str]:
        response = self.response
        for index, out in enumerate(response["output"]):
            part = self.parts.get(out["type"])
            if part is not None:
                if part.index is None:
                    yield from self._open(part, index)
                yield self.event(f"{part.events}.done", item_id=out["id"], output_index=index, content_index=0,
                                 text=part.text)
                yield self.event("response.content_part.done", item_id=out["id"], output_index=index, content_index=0,
                                 part=out["content"][0])
            else:
                yield self.event("response.output_item.added", output_index=index,
                                 item={**out, "arguments": "", "status": "in_progress"})
                yield self.event("response.function_call_arguments.delta", item_id=out["id"], output_index=index,
                                 delta=out["arguments"])
                yield self.event("response.function_call_arguments.done", item_id=out["id"], output_index=index,
                                 arguments=out["arguments"])
            yield self.event("response.output_item.done", output_index=index, item=out)
        yield self.event(f"response.{response['status']}", response=response)  # response.completed or .incomplete

    def error(self, err: ApiError) -> Iterator[str]:
        yield self.event("error", code=err.code, message=err.message, param=None)


@router.get("/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> dict[str, Any]:
    svc = services(request)
    return await svc.pools.db.run(svc.responses.get, response_id, viewer(request))


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    svc = services(request)
    await svc.pools.db.run(svc.responses.delete, response_id, viewer(request))
    return {"id": response_id, "object": "response", "deleted": True}
