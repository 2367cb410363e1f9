"""The daemon's ASGI app. Everything it serves from is built in the lifespan and kept on
`app.state`; each API document is an adapter module that only translates."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from myllm import __version__
from myllm.api import anthropic, deepshiva_llm_service, llama_server, native, ollama, openai, rerank, ui
from myllm.api.http import errors
from myllm.api.http import metrics as metrics_api
from myllm.api.http.access_log import AccessLogMiddleware
from myllm.api.http.auth import OPEN_PATHS, ApiKeyMiddleware, KeyRing
from myllm.api.http.bodies import checked_json_body
from myllm.api.http.disconnect import CancelOnDisconnectMiddleware
from myllm.api.http.document import ApiDocument, joined
from myllm.api.http.hosts import HostAllowListMiddleware, allowed_hosts
from myllm.api.http.limits import BodyLimitMiddleware
from myllm.api.http.metrics import Metrics
from myllm.api.http.origins import OriginGuardMiddleware, Origins
from myllm.api.http.ratelimit import AuthFailureMiddleware, Limits, RateLimitMiddleware
from myllm.api.http.replica import ReplicaHeadersMiddleware, replica_id
from myllm.api.ollama.inference import JsonByDefaultMiddleware
from myllm.api.state import Services
from myllm.registry.choices import Choices
from myllm.registry.kinds import fill_in_kinds
from myllm.registry.session_turns import TurnLocks
from myllm.registry.sessions import ResponseStore, SessionStore
from myllm.registry.store import Registry
from myllm.registry.uploads import Uploads
from myllm.runtime.service import Runtime
from myllm.settings import Settings

log = logging.getLogger(__name__)


def _check_blobs(registry: Registry) -> None:
    """At start, verify every model's blob once (cached by size and mtime afterwards), so a
    missing or damaged file is reported instead of served."""
    for row in registry.list():
        problem = registry.problem(row)
        if problem:
            log.warning("model %s is broken: %s", row.name, problem)


MAIN_LISTENER: tuple[ApiDocument, ...] = (native.API, openai.API, rerank.API, anthropic.API, deepshiva_llm_service.API,
                                           llama_server.API, ui.API)
"""The API documents on the main port (a new document: its folder, and a line here)."""
OLLAMA_LISTENER: tuple[ApiDocument, ...] = (ollama.API, openai.API, rerank.API)
"""Ollama's port: its own API, the OpenAI-compatible one as Ollama serves it there too, and the
rerank API (Ollama has none; clients that point a reranker at an Ollama URL find it here)."""


def _serve(
    app: FastAPI, settings: Settings, documents: tuple[ApiDocument, ...], keys: KeyRing, limits: Limits,
    metrics: Metrics, api: str | None = None,
) -> None:
    """A listener's documents, behind what every listener applies alike: body limit, rate limits,
    API keys, pages of other origins kept from changing anything, CORS, cancelling work whose
    client left, the Host allow-list, the access log (added last, so it runs first)."""
    served = joined(documents)
    error_router = errors.ErrorRouter(default=errors.native_renderer)
    for prefix, renderer in served.errors.items():
        error_router.add(prefix, renderer)
    errors.install(app, error_router)
    # Added first, so it runs last: 401 answers carry CORS headers too.
    app.add_middleware(BodyLimitMiddleware, max_body=settings.max_body, errors=error_router,
                       unlimited=served.streamed_body_prefixes)
    # Inside the key check, which tells it who the caller is.
    app.add_middleware(RateLimitMiddleware, limits=limits, errors=error_router, generation_paths=served.generation_paths)
    app.add_middleware(ApiKeyMiddleware, keys=keys, errors=error_router, open_paths=OPEN_PATHS | served.open_paths)
    app.add_middleware(AuthFailureMiddleware, limits=limits, errors=error_router)  # before the key is looked at
    origins = Origins.from_settings(settings)
    app.add_middleware(OriginGuardMiddleware, origins=origins, errors=error_router)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(origins.listed),
        allow_origin_regex=origins.pattern,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    app.add_middleware(CancelOnDisconnectMiddleware)
    app.add_middleware(HostAllowListMiddleware, allowed=allowed_hosts(settings), errors=error_router)
    app.add_middleware(ReplicaHeadersMiddleware, replica=replica_id(settings))
    app.add_middleware(AccessLogMiddleware, api=api, on_request=metrics.request_done)
    for router in served.routers:
        app.include_router(router)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = Registry.open(settings)
        await registry.pools.blobs.run(fill_in_kinds, registry)  # rows from before kinds were recorded
        runtime = Runtime(registry, settings)
        runtime.manager.events = app.state.metrics
        await runtime.start()
        sessions = SessionStore(registry.engine)
        turns = TurnLocks(sessions, replica_id(settings), settings.turn_wait, settings.turn_lease, registry.pools.db)
        uploads = Uploads(registry, settings)
        app.state.services = Services(
            settings, registry, runtime, sessions, ResponseStore(registry.engine), time.monotonic(), turns,
            Choices(registry.engine), uploads,
        )
        for sibling in app.state.siblings:  # other listeners serve from the same services
            sibling.state.services = app.state.services
        app.state.ready = True
        checker = asyncio.create_task(registry.pools.blobs.run(_check_blobs, registry))
        renewer = asyncio.create_task(turns.renew_forever())
        sweeper = asyncio.create_task(uploads.sweep_forever())
        try:
            yield
        finally:
            app.state.ready = False
            checker.cancel()
            renewer.cancel()
            sweeper.cancel()
            await runtime.close()
            registry.close()

    app = FastAPI(
        title="myllm",
        version=__version__,
        description="A local LLM daemon: the MyLLM native API and the other documented APIs on one port.",
        lifespan=lifespan,
        dependencies=[Depends(checked_json_body)],
    )
    app.state.ready = False
    app.state.siblings = []
    # The keys are read here, once: a request never reads the key file, so changing it takes a restart.
    keys = KeyRing.load(settings)
    app.state.auth_required = bool(keys)
    app.state.keys = keys
    app.state.limits = Limits.from_settings(settings)
    app.state.metrics = Metrics()
    _serve(app, settings, MAIN_LISTENER, keys, app.state.limits, app.state.metrics)
    app.include_router(metrics_api.router)
    return app


def create_ollama_app(main: FastAPI, settings: Settings) -> FastAPI:
    """Ollama's API for the second listener (`MYLLM_OLLAMA_PORT`): its paths collide with the
    native API's, so it is an app of its own, served from `main`'s services (set by `main`'s
    lifespan; this app has none) with the same keys, origins and body limit. Ollama serves its
    OpenAI-compatible API on this port too, and clients default to `http://localhost:11434/v1`
    (pydantic-ai's OllamaProvider, dspy's `ollama_chat/`): the same `/v1` routes as the main
    port, chat and text completions, embeddings, models and Responses, in OpenAI's error shape."""
    app = FastAPI(title="myllm (Ollama API)", version=__version__, openapi_url=None, docs_url=None, redoc_url=None,
                  dependencies=[Depends(checked_json_body)])
    main.state.siblings.append(app)
    _serve(app, settings, OLLAMA_LISTENER, main.state.keys, main.state.limits, main.state.metrics, api="ollama")
    app.add_middleware(JsonByDefaultMiddleware)
    return app
