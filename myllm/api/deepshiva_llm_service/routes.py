"""The DeepShiva (002) and LLM-service (004) routes. Both documents name `POST /generate`, so
one route accepts both requests and answers with both documents' fields; errors likewise carry
both shapes' keys: `{"status": "error", "message", "detail", "error_code"}`."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from typing import Any

import psutil
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from myllm import __version__
from myllm.api.deepshiva_llm_service.models import (
    GenerateRequest,
    GenerateResponse,
    LegacyError,
    LoadModelRequest,
    ModelStatus,
    Position,
    StatusMessage,
    TokenProbability,
)
from myllm.api.http import sse
from myllm.api.http.auth import caller_of, reloading_key
from myllm.api.http.errors import ApiError
from myllm.api.http.relay import Frames, collect, relay
from myllm.api.state import Services, services
from myllm.errors import (
    Forbidden,
    InvalidModelName,
    InvalidOptions,
    ModelNotFound,
    ModelNotLoaded,
    PullError,
)
from myllm.pull import ensure_model
from myllm.registry.choices import SERVICE_MODEL
from myllm.registry.schema import ModelRow
from myllm.runtime.placement.report import per_model
from myllm.runtime.service import Candidate, DoneEvent, GenerationOptions, GenerationStream, LoadedInfo, TokenEvent

PATHS = ("/load_model", "/generate", "/stream", "/model_status", "/status")
router = APIRouter(tags=["DeepShiva / LLM service"], responses={c: {"model": LegacyError} for c in (400, 404, 422, 500, 503)})

_CODES = {
    "model_not_found": "MODEL_NOT_FOUND",
    "source_not_found": "MODEL_NOT_FOUND",
    "model_not_loaded": "MODEL_NOT_LOADED",
    "prompt_too_long": "PROMPT_TOO_LONG",
    "out_of_memory": "OUT_OF_MEMORY",
    "overloaded": "OVERLOADED",
}
_FIELD_CODES = {"temperature": "INVALID_TEMPERATURE", "max_tokens": "INVALID_MAX_TOKENS",
                "max_length": "INVALID_MAX_TOKENS", "top_k": "INVALID_TOP_K", "prompt": "EMPTY_PROMPT"}


def legacy_code(err: ApiError) -> str:
    if err.param in _FIELD_CODES and err.status in (400, 422):
        return _FIELD_CODES[err.param]
    if err.code in _CODES:
        return _CODES[err.code]
    if err.status >= 500:
        return "GENERATION_FAILED"
    return "INVALID_REQUEST" if err.status in (400, 422) else err.code.upper()


def legacy_message(err: ApiError) -> str:
    """What the documents say of an error: a bug's text is the DeepShiva document's own."""
    if err.status == 500 and err.error is None and legacy_code(err) == "GENERATION_FAILED":
        return "Token generation failed due to internal error"
    return err.message


def legacy_renderer(err: ApiError) -> Response:
    code = legacy_code(err)
    status = 422 if code.startswith("INVALID_") and code != "INVALID_REQUEST" else err.status
    message = legacy_message(err)
    return JSONResponse({"status": "error", "message": message, "detail": message, "error_code": code}, status_code=status)


def _precision(quantization: str) -> str:
    q = quantization.upper()
    named = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    if q in named:
        return named[q]
    digits = next((c for c in q.lstrip("IQ") if c.isdigit()), None)
    return f"int{digits}" if digits else quantization.lower()


# -- DeepShiva ----------------------------------------------------------------------------


@router.post("/load_model", response_model=StatusMessage)
async def load_model(request: Request, body: LoadModelRequest | None = None) -> StatusMessage:
    """Load a registered model, a local .gguf file or a Hugging Face repo (pulled first), and
    make it the model of `/generate`, `/stream` and `/model_status`. It stays loaded. An
    inference key may only load a registered model, and does not change that default for
    everyone."""
    svc = services(request)
    wanted = (body.model_name if body else None) or svc.settings.default_model
    admin = caller_of(request.scope).admin
    try:  # a registered model is looked up on the database's pool, never in line behind pulls
        row = await svc.runtime.model(wanted)
    except (ModelNotFound, InvalidModelName):
        if not admin:
            raise Forbidden("loading a model that is not registered (a path or a pull) needs an admin key") from None
        row = await svc.pools.pulls.run(ensure_model, svc.registry, svc.settings, wanted, None, svc.settings.local_model_dirs)
    name = row.name
    await svc.runtime.load(name, keep_alive=-1, caller=reloading_key(request))
    if admin:
        await svc.pools.db.run(svc.choices.put, SERVICE_MODEL, name)
    return StatusMessage(status="success", message=f"Model {wanted} loaded successfully")


@router.get("/model_status", response_model=ModelStatus)
async def model_status(request: Request) -> ModelStatus:
    svc = services(request)
    name = await svc.legacy_model()
    mine = _loaded(svc, await svc.pools.db.run(svc.registry.find, name))
    return ModelStatus(status="success", model_loaded=mine is not None, model_name=name,
                       device=mine.device if mine else "cpu")


def _loaded(svc: Services, row: ModelRow | None) -> LoadedInfo | None:
    """The model of `row` as loaded (None: not registered or not loaded), its instances as one
    (`per_model`: a GPU device if any instance has one, the largest context)."""
    return next((m for m in per_model(svc.runtime.loaded()) if row is not None and m.name == row.name), None)


# -- the shared /generate -------------------------------------------------------------------


class _Plan:
    """Both documents' parameters as one set of runtime options, after the LLM service's own
    limits (max_tokens 1-100, top_k 1-50); the ranges every API shares (temperature 0-2,
    max_length >= 1) are `GenerationOptions`' to check. `top_k` is the number of candidates
    returned per position, not a sampling option."""

    def __init__(self, body: GenerateRequest) -> None:
        service = body.max_tokens is not None or body.top_k is not None
        if not body.prompt.strip():
            raise InvalidOptions("Prompt cannot be empty", field="prompt")
        if body.max_tokens is not None and not 1 <= body.max_tokens <= 100:
            raise InvalidOptions(f"max_tokens must be between 1 and 100 (got {body.max_tokens})", field="max_tokens")
        self.top_k = body.top_k if body.top_k is not None else 5
        if not 1 <= self.top_k <= 50:
            raise InvalidOptions(f"top_k must be between 1 and 50 (got {self.top_k})", field="top_k")
        max_tokens = body.max_tokens if body.max_tokens is not None else body.max_length
        self.options = GenerationOptions.parse({
            "temperature": body.temperature if body.temperature is not None else (1.0 if service else 0.7),
            "max_tokens": max_tokens if max_tokens is not None else (1 if service else 512),
            "top_p": body.top_p, "stop": body.stop,
        })


async def _start(svc: Services, body: GenerateRequest, plan: _Plan, candidates: bool, caller: str | None) -> GenerationStream:
    """`candidates`: every generated position carries its top `plan.top_k` candidates (the LLM
    service's `/generate`); otherwise text only (`/stream`)."""
    name = body.model or await svc.legacy_model()
    if body.model is None and await svc.pools.db.run(svc.registry.find, name) is None:
        raise ModelNotLoaded("Model is not loaded. Load one with POST /load_model.")
    try:
        if candidates:
            return await svc.runtime.next_token_probabilities(name, body.prompt, plan.top_k, plan.options, caller=caller)
        return await svc.runtime.generate(name, body.prompt, plan.options, raw=True, caller=caller)
    except PullError as exc:
        raise ModelNotLoaded(exc.message) from exc


def _candidates(top: tuple[Candidate, ...]) -> list[TokenProbability]:
    return [
        TokenProbability(token=c.text, probability=round(min(1.0, c.prob), 4), percentage=round(min(100.0, c.prob * 100), 2),
                         logprob=round(c.logprob, 4), rank=i + 1)
        for i, c in enumerate(top)
    ]


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
    """DeepShiva's and the LLM service's `/generate` in one: `response` (prompt + text) and
    `status` for the first, `generated_text`, `tokens` and `metadata` for the second."""
    svc = services(request)
    plan = _Plan(body)
    started = time.perf_counter()
    stream = await _start(svc, body, plan, candidates=True, caller=reloading_key(request))
    positions: list[Position] = []

    def keep(event: TokenEvent) -> None:
        if event.top:
            positions.append(Position(token=event.piece or "", candidates=_candidates(event.top)))

    done = await collect(request, stream, keep)
    elapsed = (time.perf_counter() - started) * 1000
    return GenerateResponse(
        status="success",
        response=body.prompt + done.text,
        generated_text=done.text,
        tokens=positions[0].candidates if positions else [],
        positions=positions,
        metadata={
            "model_name": stream.model, "prompt_length": len(body.prompt), "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens, "generation_time_ms": round(elapsed),
            "temperature_used": plan.options.temperature, "device": stream.device, "finish_reason": done.finish_reason,
        },
    )


@router.post("/stream", responses={200: {"content": {"text/event-stream": {"schema": sse.EVENT_SCHEMA}},
                                         "description": "Server-Sent Events"}})
async def stream(body: GenerateRequest, request: Request) -> Response:
    """The `/generate` request answered as Server-Sent Events: each event's data is the text as
    it is generated; an event named `done` ends the stream (`error` if it failed)."""
    svc = services(request)
    plan = _Plan(body)
    events = await _start(svc, body, plan, candidates=False, caller=reloading_key(request))
    return relay(request, events, _StreamFrames())


class _StreamFrames(Frames):
    """`message` events with the text, `done` at the end, `error` with the message when it failed."""

    def token(self, event: TokenEvent) -> Iterator[str]:
        if event.text:
            yield sse.event("message", event.text)

    def done(self, done: DoneEvent) -> Iterator[str]:
        yield sse.event("done", "[DONE]")

    def error(self, err: ApiError) -> Iterator[str]:
        yield sse.event("error", legacy_message(err))


# -- LLM service ------------------------------------------------------------------------------


@router.get("/status")
async def status(request: Request) -> dict[str, Any]:
    svc = services(request)
    name = await svc.legacy_model()
    row = await svc.pools.db.run(svc.registry.find, name)
    loaded = svc.runtime.loaded()
    mine = _loaded(svc, row)
    memory = psutil.virtual_memory()
    problems = svc.runtime.problems()
    gpu = await svc.runtime.devices()
    return {
        "service": {
            "status": "degraded" if problems else "running", "problems": problems, "version": __version__,
            "uptime_seconds": round(time.monotonic() - svc.started),
            "memory_usage_mb": round(psutil.Process().memory_info().rss / (1 << 20)),
        },
        "model": {
            "name": row.name if row else name, "loaded": mine is not None, "device": mine.device if mine else "cpu",
            "precision": _precision(row.quantization) if row else None,
            "max_length": mine.context_length if mine else (row.context_length if row else None),
            "vocab_size": row.vocab_size if row else None,
        },
        "system": {
            "gpu_available": gpu.available, "gpu_name": gpu.name,
            "gpu_memory_total_mb": gpu.total >> 20 if gpu.available else None,
            "gpu_memory_used_mb": svc.runtime.gpu_memory_used() >> 20 if gpu.available else None,
            "cpu_cores": psutil.cpu_count(logical=False) or os.cpu_count(), "system_memory_gb": round(memory.total / (1 << 30)),
            "platform": platform.platform(),
        },
        "loaded_models": [
            {"name": m.name, "context_length": m.context_length, "device": m.device, "size_estimate_mb": m.size_estimate >> 20,
             "rss_growth_mb": m.rss_growth >> 20, "expires_at": m.expires_at.isoformat() if m.expires_at else None,
             "embedding": m.embedding}
            for m in loaded
        ],
    }
