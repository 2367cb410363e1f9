"""The daemon's ASGI app. State (settings, registry) is built in the lifespan and kept on
`app.state`; routes only translate requests and responses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone

from fastapi import FastAPI, Request

from myllm import __version__
from myllm.registry.store import Registry
from myllm.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.registry = Registry.open(settings)
        try:
            yield
        finally:
            app.state.registry.close()

    app = FastAPI(title="myllm", version=__version__, lifespan=lifespan)

    @app.get("/")
    def root(request: Request) -> dict[str, object]:
        return {
            "name": "MyLLM",
            "version": __version__,
            "status": "running",
            "models_available": request.app.state.registry.count(),
        }

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "healthy", "timestamp": datetime.now(timezone.utc).isoformat()}

    return app
