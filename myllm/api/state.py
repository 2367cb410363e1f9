"""Typed access to what the lifespan put on `app.state`."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from myllm.pools import Pools
from myllm.registry.choices import SERVICE_MODEL, Choices
from myllm.registry.session_turns import TurnLocks
from myllm.registry.sessions import ResponseStore, SessionStore
from myllm.registry.store import Registry
from myllm.registry.uploads import Uploads
from myllm.runtime.service import Runtime
from myllm.settings import Settings


@dataclass
class Services:
    settings: Settings
    registry: Registry
    runtime: Runtime
    sessions: SessionStore
    responses: ResponseStore
    """Stored OpenAI Responses (on the session tables)."""
    started: float
    """`time.monotonic()` at start, for uptime."""
    turns: TurnLocks
    """Serialises turns on one stored session, across daemons too (see registry/session_turns.py)."""
    choices: Choices
    """Run-time choices shared by every daemon over the database."""
    uploads: Uploads
    """Blob uploads in progress, their bounds and the sweep of unused blobs."""

    @property
    def pools(self) -> Pools:
        """Where routes run blocking calls: `pools.db` for the database, `pools.blobs` for files."""
        return self.registry.pools

    async def legacy_model(self) -> str:
        """The model `POST /load_model` chose for the DeepShiva and LLM-service routes (on
        whichever daemon it was asked), else the default."""
        return await self.pools.db.run(self.choices.get, SERVICE_MODEL) or self.settings.default_model


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]
