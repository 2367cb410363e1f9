"""The daemon's ASGI app. Everything it serves from is built in the lifespan and kept on
`app.state`; each API document is an adapter module that only translates."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from myllm import __version__
from myllm.api import compat, errors, llama_server, native, openai
from myllm.api.access_log import AccessLogMiddleware
from myllm.api.auth import ApiKeyMiddleware, load_keys
from myllm.api.disconnect import CancelOnDisconnectMiddleware
from myllm.api.limits import BodyLimitMiddleware
from myllm.api.state import Services
from myllm.registry.sessions import SessionStore
from myllm.registry.store import Registry
from myllm.runtime.service import Runtime
from myllm.settings import Settings

log = logging.getLogger(__name__)
LOCAL_ORIGINS = r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$"


def _check_blobs(registry: Registry) -> None:
    """At start, verify every model's blob once (cached by size and mtime afterwards), so a
    missing or damaged file is reported instead of served."""
    for row in registry.list():
        problem = registry.problem(row)
        if problem:
            log.warning("model %s is broken: %s", row.name, problem)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = Registry.open(settings)
        runtime = Runtime(registry, settings)
        await runtime.start()
        app.state.services = Services(settings, registry, runtime, SessionStore(registry.sessions), time.monotonic())
        app.state.ready = True
        checker = asyncio.create_task(asyncio.to_thread(_check_blobs, registry))
        try:
            yield
        finally:
            app.state.ready = False
            checker.cancel()
            await runtime.close()
            registry.close()

    app = FastAPI(
        title="myllm",
        version=__version__,
        description="A local LLM daemon: the MyLLM native API and the other documented APIs on one port.",
        lifespan=lifespan,
    )
    app.state.ready = False
    error_router = errors.ErrorRouter(default=errors.native_renderer)
    error_router.add(openai.PREFIX, openai.openai_renderer)
    for path in compat.PATHS:
        error_router.add(path, compat.legacy_renderer)
    error_router.add(llama_server.PATH, llama_server.llama_renderer)
    errors.install(app, error_router)
    # Added last, so it runs first: 401 answers carry CORS headers too.
    app.add_middleware(BodyLimitMiddleware, max_body=settings.max_body, errors=error_router)
    # The keys are read here, once: a request never reads the key file, so changing it takes a restart.
    keys = load_keys(settings)
    app.state.auth_required = bool(keys)
    app.add_middleware(ApiKeyMiddleware, keys=keys, errors=error_router)
    origins = [o.strip() for o in (settings.origins or "").split(",") if o.strip()]
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_origin_regex=None if origins else LOCAL_ORIGINS,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    app.add_middleware(CancelOnDisconnectMiddleware)
    app.add_middleware(AccessLogMiddleware)
    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(compat.router)
    app.include_router(llama_server.router)
    return app
