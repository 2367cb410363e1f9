"""Typed access to what the lifespan put on `app.state`."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from myllm.api.turns import TurnLocks
from myllm.registry.sessions import ResponseStore, SessionStore
from myllm.registry.store import Registry
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
    """Serialises turns on one stored session, across daemons too (see api/turns.py)."""
    selected_model: str | None = None
    """The model `POST /load_model` chose for the DeepShiva and LLM-service routes."""

    @property
    def legacy_model(self) -> str:
        return self.selected_model or self.settings.default_model


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]
