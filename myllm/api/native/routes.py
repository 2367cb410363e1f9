"""The native MyLLM API (`GET /`, `/health`, `/api/*`): requests to runtime calls, events to
the document's JSON and Server-Sent Events."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from myllm import __version__
from myllm.api.http import sse
from myllm.api.http.auth import keep_alive_of, reloading_key, require_admin, viewer
from myllm.api.http.errors import ApiError
from myllm.api.http.relay import Frames, collect, relay
from myllm.api.http.replica import answered_for, session_of
from myllm.api.http.stored_turns import earlier_messages, kept_contents
from myllm.api.native.models import (
    ChatRequest,
    ChatResponse,
    EmbeddingResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    ErrorDetail,
    GenerateRequest,
    GenerateResponse,
    Health,
    InferenceOptions,
    Message,
    ModelDetail,
    ModelInfo,
    ModelList,
    RunningList,
    RunningModel,
    ServerInfo,
    SessionDetail,
    SessionList,
    SessionMessage,
    SessionSummary,
    StatusMessage,
    StoredFile,
    Think,
    Usage,
)
from myllm.api.state import services
from myllm.errors import InvalidOptions
from myllm.registry.schema import ModelRow
from myllm.registry.session_images import Content, media_type
from myllm.registry.sessions import NewMessage, SessionInfo, check_session_id, new_session_id
from myllm.runtime.placement.report import per_model
from myllm.runtime.request.images import from_base64
from myllm.runtime.request.template import check_think, template_name, thinks
from myllm.runtime.service import DoneEvent, GenerationOptions, GenerationStream, TokenEvent

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorDetail} for code in (400, 404, 500, 503)
}
router = APIRouter(responses=ERRORS)


@router.get("/", response_model=ServerInfo, response_model_exclude_none=True, tags=["MyLLM"])
async def root(request: Request) -> ServerInfo:
    svc = services(request)
    count = await svc.pools.db.run(svc.registry.count)
    ollama_port = getattr(request.app.state, "ollama_port", None)
    return ServerInfo(name="MyLLM", version=__version__, status="running", models_available=count, ollama_port=ollama_port)


@router.get("/health", tags=["MyLLM"], response_model=Health, responses={503: {"model": Health}})
async def health(request: Request, ready: bool = False) -> JSONResponse:
    """Liveness: 200 once the daemon serves requests, 503 while it starts or shuts down; the
    body says what is degraded. Readiness (`?ready=1`): 503 while anything is."""
    serving = getattr(request.app.state, "ready", False)
    problems = services(request).runtime.problems() if serving else []
    status = "starting" if not serving else "degraded" if problems else "healthy"
    body = {"status": status, "timestamp": datetime.now(timezone.utc).isoformat(), "problems": problems}
    return JSONResponse(body, status_code=200 if serving and not (ready and problems) else 503)


def model_info(row: ModelRow, loaded: bool, problem: str | None) -> dict[str, Any]:
    """The list's fields of one model (`ModelInfo`)."""
    return {
        "name": row.name, "family": row.family, "size_mb": round(row.size / (1 << 20)), "quantization": row.quantization,
        "context_size": row.context_length, "template": template_name(row.template, row.family),
        "parameters": row.parameters or {}, "loaded": loaded, "status": "broken" if problem else "ok", "problem": problem,
        "digest": row.digest, "size": row.size, "modified_at": row.modified_at.isoformat(), "thinking": thinks(row.template),
        "vision": row.vision, "kind": row.kind,
    }


async def _thinking_model(request: Request, name: str, think: Think) -> ModelRow:
    """The model's row; thinking asked of a model that cannot think is a 400, as on Ollama's API."""
    row = await services(request).runtime.model(name)
    check_think(row, think, "think")
    return row


@router.get("/api/models", response_model=ModelList, tags=["MyLLM"])
async def list_models(request: Request) -> ModelList:
    svc = services(request)
    rows = await svc.pools.db.run(svc.registry.list)
    problems = await svc.pools.blobs.run(lambda: [svc.registry.problem(r) for r in rows])
    return ModelList(models=[ModelInfo(**model_info(r, svc.runtime.is_loaded(r.name), p)) for r, p in zip(rows, problems)])


@router.get("/api/models/{model_name}", response_model=ModelDetail, tags=["MyLLM"])
async def get_model(model_name: str, request: Request) -> ModelDetail:
    svc = services(request)
    row = await svc.runtime.model(model_name)
    problem = await svc.pools.blobs.run(svc.registry.problem, row)
    return ModelDetail(
        **model_info(row, svc.runtime.is_loaded(row.name), problem),
        architecture=row.architecture, parameter_count=row.parameter_count, parameter_size=row.parameter_size,
        embedding_length=row.embedding_length, vocab_size=row.vocab_size, license=row.license, source=row.shown_source,
        system=row.system, chat_template=row.template, created_at=row.created_at.isoformat(),
        projector_digest=row.projector_digest, projector_size=row.projector_size,
        adapters=[StoredFile(digest=a["digest"], size=a["size"]) for a in row.adapters or ()],
        draft_digest=row.draft_digest, draft_size=row.draft_size,
    )


@router.post("/api/models/{model_name}/load", response_model=StatusMessage, tags=["MyLLM"])
async def load_model(model_name: str, request: Request) -> StatusMessage:
    info = await services(request).runtime.load(model_name, caller=reloading_key(request))
    return StatusMessage(status="success", message=f"Model '{info.name}' loaded")


@router.post("/api/models/{model_name}/unload", response_model=StatusMessage, tags=["MyLLM"])
async def unload_model(model_name: str, request: Request) -> StatusMessage:
    """Unloads at once; requests still running on the model end with an error."""
    require_admin(request, "unloading a model")
    svc = services(request)
    row = await svc.runtime.model(model_name)
    await svc.runtime.unload(row.name)
    return StatusMessage(status="success", message=f"Model '{row.name}' unloaded")


@router.get("/api/ps", response_model=RunningList, tags=["MyLLM"])
async def running(request: Request) -> RunningList:
    """Extension (Ollama's `ps`): the loaded models, one row per model however many instances
    it has (`per_model`)."""
    return RunningList(models=[
        RunningModel(
            name=m.name, size_mb=m.size_estimate >> 20, rss_growth_mb=max(0, m.rss_growth) >> 20,
            context_length=m.context_length, processor=m.processor, size_vram_mb=m.size_vram >> 20,
            vram_used_mb=m.vram_used >> 20, gpu_layers=m.gpu_layers, layers=m.layers,
            expires_at=m.expires_at.isoformat() if m.expires_at else None, active=m.active, queued=m.queued,
            busy=m.busy, slots=m.slots, memory_mb=m.rss >> 20,
        )
        for m in per_model(services(request).runtime.loaded())
    ])


def generation_options(options: InferenceOptions) -> GenerationOptions:
    """The document's options as the runtime's; only what the request set counts as set, so
    the model's stored defaults fill in the rest."""
    return GenerationOptions.parse(options.model_dump())


def usage_of(done: DoneEvent) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
    )


OnDone = Callable[[DoneEvent], Awaitable[None]]


class _Frames(Frames):
    """The document's SSE: a `token` event per piece, then `done` with the full text (the turn
    stored by `on_done` first). An error after the stream started is a last
    `{"error": ..., "done": true}` event."""

    def __init__(self, on_done: OnDone, final: dict[str, Any]) -> None:
        self.on_done, self.final = on_done, final

    def token(self, event: TokenEvent) -> Iterator[str]:
        if event.thinking:
            yield sse.data({"thinking": event.thinking, "done": False})
        if event.text:
            yield sse.data({"token": event.text, "done": False})

    async def settle(self, done: DoneEvent) -> None:
        await self.on_done(done)

    def done(self, done: DoneEvent) -> Iterator[str]:
        thinking = {"thinking": done.thinking} if done.thinking else {}
        yield sse.data({"done": True, **self.final, "full_text": done.text, **thinking, "usage": usage_of(done).model_dump()})

    def error(self, err: ApiError) -> Iterator[str]:
        yield sse.data({"error": err.message, "done": True})


async def _answer(request: Request, stream: GenerationStream, on_done: OnDone, release: Callable[[], None]) -> DoneEvent:
    """A whole (non-streamed) answer, stored by `on_done`; the session's turn ends either way."""
    try:
        done = await collect(request, stream)
        await on_done(done)
    finally:
        release()
    return done


def _content(m: Message) -> Content:
    """A message as the runtime takes it: its images (base64 each) before its text, where Ollama
    puts them; its thinking stays out of the prompt."""
    return [*(from_base64(image) for image in m.images), m.content] if m.images else m.content


def _history_messages(stored: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored turns, then the new messages; a system message sent now replaces stored ones."""
    sends_system = any(m["role"] == "system" for m in new)
    earlier = [m for m in stored if not (sends_system and m["role"] == "system")]
    system = [m for m in new if m["role"] == "system"]
    return system + earlier + [m for m in new if m["role"] != "system"]


@router.post("/api/chat", response_model=ChatResponse, tags=["MyLLM"], responses=sse.STREAM_DOC)
async def chat(body: ChatRequest, request: Request) -> Response | ChatResponse:
    """Chat with history: a `session_id` continues (or starts) a stored session; without one a
    new session is started. When the conversation outgrows the context, the oldest turns
    after the system message are left out of the prompt; the stored history stays whole."""
    svc = services(request)
    model = await _thinking_model(request, body.model or svc.settings.default_model, body.think)
    named = session_of(request, body.session_id)
    session_id = check_session_id(named, viewer(request)) if named else new_session_id()
    new = [{"role": m.role, "content": _content(m)} for m in body.messages]
    answered_for(request, session_id)
    turn = await svc.turns.acquire(session_id, "chat", model.name, viewer(request))
    try:
        stored = await svc.pools.db.run(svc.sessions.history, session_id, viewer(request)) if named else []
        stream = await svc.runtime.chat(
            model,
            _history_messages(await earlier_messages(svc, stored, new), new),
            generation_options(body.options),
            keep_alive=keep_alive_of(request, body.keep_alive),
            trim=True,
            count=[m.content for m in body.messages],
            think=body.think,
            caller=reloading_key(request),
        )
    except BaseException:
        turn.release()
        raise

    async def save(done: DoneEvent) -> None:
        contents = await kept_contents(svc, [m["content"] for m in new])
        messages: list[NewMessage] = [(m["role"], c, n) for m, c, n in zip(new, contents, stream.counts)]
        messages.append(("assistant", done.text, done.completion_tokens, done.thinking or None))
        await svc.pools.db.run(svc.sessions.append_turn, session_id, "chat", stream.model, messages, viewer(request),
                                turn.holder)

    if body.stream:
        return relay(request, stream, _Frames(save, {"session_id": session_id}), after=turn.release)
    done = await _answer(request, stream, save, turn.release)
    return ChatResponse(message=Message(role="assistant", content=done.text, thinking=done.thinking or None),
                        session_id=session_id, usage=usage_of(done))


@router.post("/api/generate", response_model=GenerateResponse, response_model_exclude_none=True, tags=["MyLLM"],
             responses=sse.STREAM_DOC)
async def generate(body: GenerateRequest, request: Request) -> Response | GenerateResponse:
    """Stateless unless a `session_id` is given, in which case earlier prompt/response pairs
    of that session come first and this pair is stored."""
    svc = services(request)
    model = await _thinking_model(request, body.model or svc.settings.default_model, body.think)
    named = session_of(request, body.session_id)
    session_id = check_session_id(named, viewer(request)) if named else None
    images = [from_base64(image) for image in body.images or []]
    if session_id and images:
        raise InvalidOptions("a generate session keeps no images: send them to /api/chat, whose sessions keep them",
                             field="images")
    if session_id:
        answered_for(request, session_id)
    history: list[tuple[str, str]] = []
    turn = await svc.turns.acquire(session_id, "generate", model.name, viewer(request)) if session_id else None
    release = turn.release if turn else (lambda: None)
    try:
        if session_id:
            stored = await svc.pools.db.run(svc.sessions.history, session_id, viewer(request))
            history = [(u.content, a.content) for u, a in zip(stored[::2], stored[1::2])]
        stream = await svc.runtime.generate(
            model, body.prompt, generation_options(body.options), system=body.system, raw=body.raw,
            keep_alive=keep_alive_of(request, body.keep_alive), history=history, count=[body.prompt], think=body.think,
            images=images, caller=reloading_key(request),
        )
    except BaseException:
        release()
        raise

    async def save(done: DoneEvent) -> None:
        if session_id and turn:
            messages: list[NewMessage] = [("user", body.prompt, stream.counts[0]),
                                          ("assistant", done.text, done.completion_tokens, done.thinking or None)]
            await svc.pools.db.run(svc.sessions.append_turn, session_id, "generate", stream.model, messages,
                                    viewer(request), turn.holder)

    if body.stream:
        return relay(request, stream, _Frames(save, {"session_id": session_id} if session_id else {}), after=release)
    done = await _answer(request, stream, save, release)
    return GenerateResponse(text=done.text, usage=usage_of(done), session_id=session_id, thinking=done.thinking or None)


@router.post(
    "/api/embeddings", response_model=EmbeddingResponse | EmbeddingsResponse, tags=["MyLLM"]
)
async def embeddings(body: EmbeddingsRequest, request: Request) -> EmbeddingResponse | EmbeddingsResponse:
    """A string gives `embedding`; a list of strings gives `embeddings`, one per string."""
    svc = services(request)
    model = body.model or svc.settings.default_model
    texts = [body.input] if isinstance(body.input, str) else body.input
    result = await svc.runtime.embed(model, texts, keep_alive=keep_alive_of(request, body.keep_alive),
                                     caller=reloading_key(request))
    if isinstance(body.input, str):
        return EmbeddingResponse(embedding=result.vectors[0], model=result.model)
    return EmbeddingsResponse(embeddings=result.vectors, model=result.model)


def _summary(info: SessionInfo) -> SessionSummary:
    return SessionSummary(
        id=info.id, kind=info.kind, model=info.model, created=info.created_at.isoformat(),
        updated=info.updated_at.isoformat(), message_count=info.message_count, preview=info.preview,
    )


@router.get("/api/sessions", response_model=SessionList, tags=["Sessions"])
async def list_sessions(request: Request) -> SessionList:
    svc = services(request)
    infos = await svc.pools.db.run(svc.sessions.list, viewer(request))
    return SessionList(sessions=[_summary(i) for i in infos])


@router.get("/api/sessions/{session_id}", response_model=SessionDetail, tags=["Sessions"])
async def get_session(session_id: str, request: Request) -> SessionDetail:
    svc = services(request)
    info, messages = await svc.pools.db.run(svc.sessions.get, session_id, viewer(request))
    return SessionDetail(
        **_summary(info).model_dump(),
        messages=[
            SessionMessage(role=m.role, content=m.content, tokens=m.tokens, model=m.model, created=m.created_at.isoformat(),
                           thinking=m.thinking, images=[image.digest for _, image in m.images])
            for m in messages
        ],
    )


@router.get("/api/sessions/{session_id}/images/{digest}", tags=["Sessions"], response_class=Response,
            responses={200: {"content": {kind: {} for kind in ("image/png", "image/jpeg", "image/webp", "image/gif")},
                             "description": "the image file as it was sent"}})
async def session_image(session_id: str, digest: str, request: Request) -> Response:
    """Extension: an image of the session's messages, by the digest its message lists, to
    whoever may see the session (404 otherwise, and for a digest the session does not hold)."""
    svc = services(request)
    await svc.pools.db.run(svc.sessions.image, session_id, digest, viewer(request))
    data = await svc.pools.blobs.run(svc.registry.images.read, digest)
    return Response(data, media_type=media_type(data[:16]),
                    headers={"Cache-Control": "private", "X-Content-Type-Options": "nosniff"})


@router.delete("/api/sessions/{session_id}", response_model=StatusMessage, tags=["Sessions"])
async def delete_session(session_id: str, request: Request) -> StatusMessage:
    """Its images' files go too, unless a model or another conversation uses them."""
    svc = services(request)
    digests = await svc.pools.db.run(svc.sessions.delete, session_id, viewer(request))
    if digests:
        await svc.pools.blobs.run(svc.registry.images.let_go, digests)
    return StatusMessage(status="success", message=f"Session '{session_id}' deleted")
