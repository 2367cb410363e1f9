"""The OpenAI-style `/v1` API: OpenAI requests to runtime calls, runtime events to OpenAI
objects and chunks. Errors take OpenAI's shape (see `openai_renderer`), never FastAPI's 422."""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from myllm.api.http import sse
from myllm.api.http.auth import keep_alive_of, reloading_key
from myllm.api.http.errors import ApiError
from myllm.api.http.relay import Frames, collect, relay
from myllm.api.openai.models import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    CompletionTokensDetails,
    ContentPart,
    EmbeddingList,
    EmbeddingObject,
    EmbeddingRequest,
    EmbeddingUsage,
    ErrorObject,
    FunctionCall,
    ModelListObject,
    ModelObject,
    PromptTokensDetails,
    ResponseFormat,
    Timings,
    ToolCallObject,
    UsageObject,
    _Sampling,
)
from myllm.api.state import services
from myllm.errors import InvalidOptions
from myllm.registry.schema import ModelRow
from myllm.runtime.request.images import Content, Image, from_url
from myllm.runtime.request.template import Think, check_think
from myllm.runtime.request.tools import Call
from myllm.runtime.service import DoneEvent, GenerationOptions, GenerationStream, TokenEvent

PREFIX = "/v1"
router = APIRouter(prefix=PREFIX, tags=["OpenAI"], responses={c: {"model": ErrorObject} for c in (400, 401, 404, 500, 503)})

_PARAMS = {"format": "response_format"}
"""The runtime's option names that this API spells differently, for `param`."""
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error"}


def openai_error(err: ApiError) -> dict[str, Any]:
    code = err.code
    if err.status == 401:
        code = "invalid_api_key"
    param = _PARAMS.get(err.param, err.param) if err.param is not None else None
    return {"error": {"message": err.message, "type": _TYPES.get(err.status, "server_error"),
                      "param": param, "code": code}}


def openai_renderer(err: ApiError) -> Response:
    return JSONResponse(openai_error(err), status_code=err.status)


# -- models ---------------------------------------------------------------------------


def model_object(row: ModelRow) -> ModelObject:
    return ModelObject(id=row.name, created=int(row.created_at.timestamp()), owned_by="myllm")


@router.get("/models", response_model=ModelListObject)
async def list_models(request: Request) -> ModelListObject:

    svc = services(request)
    rows = await svc.pools.db.run(svc.registry.list)
    return ModelListObject(data=[model_object(r) for r in rows])


@router.get("/models/{model_id:path}", response_model=ModelObject)
async def get_model(model_id: str, request: Request) -> ModelObject:
    return model_object(await services(request).runtime.model(model_id))


# -- shared request handling -----------------------------------------------------------


def _options(
    body: _Sampling, max_tokens: int | None, logprobs: int | None, fmt: Literal["json"] | dict[str, Any] | None = None
) -> GenerationOptions:
    """The request as the runtime's options, after this API's own limits (4 stop sequences,
    one choice); the ranges every API shares are `GenerationOptions`' to check."""
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    if stop is not None and len(stop) > 4:
        raise InvalidOptions(f"stop takes at most 4 sequences (got {len(stop)})", field="stop")
    if body.n is not None and body.n != 1:
        raise InvalidOptions("n must be 1: myllm returns one choice per request; send several requests", field="n")
    for unsupported in ("functions", "function_call"):  # the deprecated forms of tools
        value = (body.model_extra or {}).get(unsupported)
        if value and value != "none":
            raise InvalidOptions(f"'{unsupported}' is not supported; send 'tools'", field=unsupported)
    return GenerationOptions.parse({
        "temperature": body.temperature, "top_p": body.top_p, "max_tokens": max_tokens, "stop": stop,
        "seed": body.seed, "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
        "top_k": body.top_k, "min_p": body.min_p, "repeat_penalty": body.repeat_penalty,
        "logprobs": logprobs, "format": fmt, "draft_max": body.draft_max, "lora": body.lora,
    })


def _format(fmt: ResponseFormat | None) -> Literal["json"] | dict[str, Any] | None:
    """`response_format` as the runtime's `format`: "json" for any object, else the schema."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return "json"
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidOptions("response_format json_schema needs json_schema.schema", field="response_format")
    return fmt.json_schema.schema_


def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation as the runtime's messages. A tool result names its function, which
    templates show, found through the call it answers (OpenAI's messages name only the call)."""
    called: dict[str, str] = {}
    out = []
    for i, msg in enumerate(messages):
        for call in msg.tool_calls or []:
            called[call.id] = call.function.name
        message = _message(msg, i)
        if message["role"] == "tool" and not msg.name and msg.tool_call_id in called:
            message["name"] = called[msg.tool_call_id]
        out.append(message)
    return out


def _message(msg: ChatMessage, index: int) -> dict[str, Any]:
    role = "system" if msg.role == "developer" else msg.role
    if role not in ("system", "user", "assistant", "tool"):
        raise InvalidOptions(f"messages[{index}].role {msg.role!r} is not supported (system, user, assistant, tool)",
                             field=f"messages[{index}].role")
    content: Content = msg.content if isinstance(msg.content, str) else ""
    if isinstance(msg.content, list):
        pieces = [_part(part, f"messages[{index}].content[{j}]") for j, part in enumerate(msg.content)]
        texts = [piece for piece in pieces if isinstance(piece, str)]
        content = "".join(texts) if len(texts) == len(pieces) else pieces  # text parts joined as before
    out: dict[str, Any] = {"role": role, "content": content}
    if msg.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in msg.tool_calls]
    if role == "tool" and msg.name:
        out["name"] = msg.name
    return out


def _part(part: ContentPart, field: str) -> str | Image:
    """A content part as the runtime takes it: a text part's text, an `image_url` part's image
    (a data URI's bytes, or an http(s) URL the runtime fetches when MYLLM_IMAGE_URLS allows it;
    `detail` is the model's own business here, as in llama-server)."""
    if part.type == "text" and part.text is not None:
        return part.text
    if part.type == "image_url":
        image = part.image_url
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise InvalidOptions(f"{field}.image_url.url must be a string", field=field)
        return from_url(url, field)
    raise InvalidOptions(f"{field}: only text and image_url parts are supported (got {part.type!r})", field=field)


def _tool_choice(body: ChatCompletionRequest) -> str:
    choice = body.tool_choice
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    name = choice.function.get("name")
    if not isinstance(name, str):
        raise InvalidOptions("tool_choice.function.name must be a string", field="tool_choice")
    return name


def _tool_calls(calls: list[Call]) -> list[ToolCallObject]:
    return [ToolCallObject(id=c.id, function=FunctionCall(name=c.name, arguments=json.dumps(c.arguments, ensure_ascii=False)))
            for c in calls]


def _usage(dones: list[DoneEvent]) -> UsageObject:
    prompt, completion = sum(d.prompt_tokens for d in dones), sum(d.completion_tokens for d in dones)
    cached = sum(d.prompt_tokens - d.prompt_eval_tokens for d in dones)
    return UsageObject(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                       prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
                       completion_tokens_details=CompletionTokensDetails(
                           reasoning_tokens=sum(d.thinking_tokens for d in dones)))


def _timings(dones: list[DoneEvent]) -> Timings:
    return Timings(
        cache_n=sum(d.prompt_tokens - d.prompt_eval_tokens for d in dones),
        prompt_n=sum(d.prompt_eval_tokens for d in dones), prompt_ms=sum(d.prompt_ms for d in dones),
        predicted_n=sum(d.completion_tokens for d in dones), predicted_ms=sum(d.generation_ms for d in dones),
        **({"draft_n": drafted, "draft_n_accepted": sum(d.draft_accepted for d in dones)}
           if (drafted := sum(d.draft_tokens for d in dones)) else {}),
    )


def _think(body: ChatCompletionRequest, model: ModelRow) -> Think:
    """The request's thinking: `reasoning_effort` (none and minimal are off), else llama-server's
    `chat_template_kwargs.enable_thinking`, else the model's default. Asking a model that
    cannot think to think is a 400, as OpenAI answers it for its models without reasoning."""
    effort = body.reasoning_effort
    enabled = body.chat_template_kwargs.enable_thinking if body.chat_template_kwargs else None
    think: Think = (effort not in ("none", "minimal") and effort) if effort is not None else enabled
    check_think(model, think, "reasoning_effort" if effort is not None else "chat_template_kwargs")
    return think


def _finish(done: DoneEvent) -> str:
    return done.finish_reason if done.finish_reason in ("length", "tool_calls") else "stop"


def _chat_logprob(event: TokenEvent) -> dict[str, Any]:
    piece = event.piece or ""
    return {
        "token": piece, "logprob": event.logprob, "bytes": list(piece.encode("utf-8")),
        "top_logprobs": [{"token": c.text, "logprob": c.logprob, "bytes": list(c.text.encode("utf-8"))}
                         for c in event.top or ()],
    }


# -- chat ------------------------------------------------------------------------------


@router.post("/chat/completions", response_model=ChatCompletion, responses=sse.STREAM_DOC)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response | ChatCompletion:
    svc = services(request)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidOptions("top_logprobs needs logprobs: true", field="top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise InvalidOptions(f"top_logprobs must be between 0 and 20 (got {body.top_logprobs})", field="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    options = _options(body, body.max_completion_tokens or body.max_tokens, logprobs, _format(body.response_format))
    model = await svc.runtime.model(body.model or svc.settings.default_model)
    stream = await svc.runtime.chat(
        model,
        _messages(body.messages),
        options,
        keep_alive=keep_alive_of(request, body.keep_alive),
        tools=body.tools,
        tool_choice=_tool_choice(body),
        parallel_tool_calls=body.parallel_tool_calls is not False,
        think=_think(body, model),
        caller=reloading_key(request),
    )
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return relay(request, stream, _ChatFrames(stream, cid, created, usage, logprobs is not None))
    entries: list[dict[str, Any]] = []

    def keep(event: TokenEvent) -> None:
        if event.logprob is not None:
            entries.append(_chat_logprob(event))

    done = await collect(request, stream, keep)
    return ChatCompletion(
        id=cid, created=created, model=stream.model, usage=_usage([done]), timings=_timings([done]),
        choices=[ChatChoice(index=0, message=AssistantMessage(content=done.text or (None if stream.tool_calls else ""),
                                                              reasoning_content=done.thinking or None,
                                                              tool_calls=_tool_calls(stream.tool_calls) or None),
                            finish_reason=_finish(done),
                            logprobs={"content": entries} if logprobs is not None else None)],
    )


class _Chunks(Frames):
    """What both streams end with: an error as OpenAI's error object, then `[DONE]`."""

    def error(self, err: ApiError) -> Iterator[str]:
        yield sse.data(openai_error(err))

    def end(self) -> Iterator[str]:
        yield sse.data("[DONE]")


class _ChatFrames(_Chunks):
    """Chat completion chunks: the role, a chunk per piece of text (with its tokens' logprobs),
    the tool calls (their arguments in pieces), the finish reason with llama-server's
    `timings`, with `include_usage` a chunk with the usage, then `[DONE]`."""

    def __init__(self, stream: GenerationStream, cid: str, created: int, include_usage: bool, with_logprobs: bool) -> None:
        self.stream = stream
        self.cid, self.created = cid, created
        self.include_usage, self.with_logprobs = include_usage, with_logprobs
        self.pending: list[dict[str, Any]] = []
        """Logprobs of tokens whose text has not gone out yet."""

    def chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs: list[dict[str, Any]] | None = None,
              timings: Timings | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.cid, "object": "chat.completion.chunk", "created": self.created, "model": self.stream.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                         "logprobs": {"content": logprobs} if self.with_logprobs and logprobs is not None else None}],
        }
        if self.include_usage:
            body["usage"] = None
        if timings is not None:  # on the last chunk, as llama-server does
            body["timings"] = timings.model_dump(exclude_none=True)
        return sse.data(body)

    def start(self, stream: GenerationStream) -> Iterator[str]:
        yield self.chunk({"role": "assistant", "content": ""})

    def token(self, event: TokenEvent) -> Iterator[str]:
        if event.logprob is not None and event.token_id >= 0:
            self.pending.append(_chat_logprob(event))
        if event.thinking:
            yield self.chunk({"reasoning_content": event.thinking})
        if event.text:
            yield self.chunk({"content": event.text}, logprobs=self.pending)
            self.pending = []

    def done(self, done: DoneEvent) -> Iterator[str]:
        for i, call in enumerate(_tool_calls(self.stream.tool_calls)):
            yield self.chunk({"tool_calls": [{"index": i, "id": call.id, "type": "function",
                                              "function": {"name": call.function.name, "arguments": ""}}]})
            for piece in sse.pieces(call.function.arguments):
                yield self.chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        yield self.chunk({}, _finish(done), logprobs=self.pending or None, timings=_timings([done]))
        if self.include_usage:
            yield sse.data({"id": self.cid, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.stream.model, "choices": [], "usage": _usage([done]).model_dump()})


# -- completions ----------------------------------------------------------------------


def _legacy_logprobs(events: list[TokenEvent], offset: int) -> dict[str, Any]:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in events:
        piece = e.piece or ""
        offsets.append(offset)
        offset += len(piece)
        tokens.append(piece)
        token_logprobs.append(e.logprob)
        top.append({c.text: c.logprob for c in e.top or ()})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


@router.post("/completions", response_model=Completion, responses=sse.STREAM_DOC)
async def completions(body: CompletionRequest, request: Request) -> Response | Completion:
    svc = services(request)
    if body.suffix:
        raise InvalidOptions("suffix (fill-in-the-middle) is not supported", field="suffix")
    if body.logprobs is not None and not 0 <= body.logprobs <= 5:
        raise InvalidOptions(f"logprobs must be between 0 and 5 (got {body.logprobs})", field="logprobs")
    if body.echo and body.logprobs is not None:
        raise InvalidOptions("echo together with logprobs is not supported", field="echo")
    options = _options(body, body.max_tokens, body.logprobs)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise InvalidOptions("prompt must not be empty", field="prompt")
    if len(prompts) > svc.settings.max_queue:  # each prompt is a generation of its own, one after another
        raise InvalidOptions(f"{len(prompts)} prompts, more than the {svc.settings.max_queue} requests a model takes "
                             "waiting (MYLLM_MAX_QUEUE); send them in smaller batches", field="prompt")
    model = await svc.runtime.model(body.model or svc.settings.default_model)  # a 404 before anything starts
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    async def start(prompt: str) -> GenerationStream:
        return await svc.runtime.generate(model, prompt, options, raw=True, keep_alive=keep_alive_of(request, body.keep_alive),
                                          caller=reloading_key(request))

    if body.stream:
        first = await start(prompts[0])  # errors before the first byte still get a status code

        async def rest() -> AsyncIterator[GenerationStream]:
            for prompt in prompts[1:]:
                yield await start(prompt)

        usage = bool(body.stream_options and body.stream_options.include_usage)
        return relay(request, first, _CompletionFrames(prompts, body.echo, cid, created, usage), more=rest())
    choices: list[CompletionChoice] = []
    dones: list[DoneEvent] = []
    name = model.name
    for index, prompt in enumerate(prompts):
        stream = await start(prompt)
        events: list[TokenEvent] = []

        def keep(event: TokenEvent) -> None:
            if event.token_id >= 0:
                events.append(event)

        done = await collect(request, stream, keep)
        name = stream.model
        dones.append(done)
        choices.append(CompletionChoice(
            index=index, text=(prompt if body.echo else "") + done.text, finish_reason=_finish(done),
            logprobs=_legacy_logprobs(events, 0) if body.logprobs is not None else None,
        ))
    return Completion(id=cid, created=created, model=name, choices=choices, usage=_usage(dones), timings=_timings(dones))


class _CompletionFrames(_Chunks):
    """Text completion chunks, prompt after prompt (each prompt a stream of its own, its
    `index`): with `echo` the prompt, a chunk per piece of text (with its logprobs), the
    finish reason with `timings`; after the last prompt, with `include_usage`, a chunk with
    the usage of all, then `[DONE]`."""

    def __init__(self, prompts: list[str], echo: bool, cid: str, created: int, include_usage: bool) -> None:
        self.prompts, self.echo = prompts, echo
        self.cid, self.created, self.include_usage = cid, created, include_usage
        self.index = -1
        self.model = ""
        self.offset = 0
        """Where the next piece starts in this prompt's text (logprobs' `text_offset`)."""
        self.dones: list[DoneEvent] = []

    def chunk(self, text: str, finish: str | None, logprobs: dict[str, Any] | None = None,
              timings: Timings | None = None) -> str:
        body: dict[str, Any] = {"id": self.cid, "object": "text_completion", "created": self.created, "model": self.model,
                                "choices": [{"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        if self.include_usage:
            body["usage"] = None
        if timings is not None:
            body["timings"] = timings.model_dump(exclude_none=True)
        return sse.data(body)

    def start(self, stream: GenerationStream) -> Iterator[str]:
        self.index += 1
        self.model, self.offset = stream.model, 0
        if self.echo:
            yield self.chunk(self.prompts[self.index], None)

    def token(self, event: TokenEvent) -> Iterator[str]:
        if event.text or event.logprob is not None:
            lp = _legacy_logprobs([event], self.offset) if event.logprob is not None and event.token_id >= 0 else None
            self.offset += len(event.text)
            yield self.chunk(event.text, None, lp)

    def done(self, done: DoneEvent) -> Iterator[str]:
        self.dones.append(done)
        yield self.chunk("", _finish(done), timings=_timings([done]))
        if self.include_usage and self.index == len(self.prompts) - 1:
            yield sse.data({"id": self.cid, "object": "text_completion", "created": self.created, "model": self.model,
                            "choices": [], "usage": _usage(self.dones).model_dump()})


# -- embeddings -----------------------------------------------------------------------


@router.post("/embeddings", response_model=EmbeddingList)
async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingList:
    svc = services(request)
    raw = body.input
    if isinstance(raw, str):
        inputs: list[str | list[int]] = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        inputs = [list(raw)]  # type: ignore[arg-type]
    else:
        inputs = list(raw)  # type: ignore[arg-type]
    result = await svc.runtime.embed(body.model or svc.settings.default_model, inputs,
                                     keep_alive=keep_alive_of(request, body.keep_alive), dimensions=body.dimensions,
                                     caller=reloading_key(request))

    def encode(vector: list[float]) -> list[float] | str:
        if body.encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        return vector

    return EmbeddingList(
        data=[EmbeddingObject(index=i, embedding=encode(v)) for i, v in enumerate(result.vectors)],
        model=result.model,
        usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
    )
