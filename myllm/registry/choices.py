"""Choices clients make at run time that every daemon over the database must honour, kept
there rather than in one daemon's memory: today the model the LLM service's and DeepShiva's
`POST /load_model` selected, which their later requests use."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from myllm.registry.schema import ChoiceRow, utcnow

SERVICE_MODEL = "service_model"
"""The model `POST /load_model` chose."""


class Choices:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def get(self, key: str) -> str | None:
        with self._sessions() as db:
            row = db.get(ChoiceRow, key)
            return row.value if row else None

    def put(self, key: str, value: str) -> None:
        with self._sessions.begin() as db:
            db.merge(ChoiceRow(key=key, value=value, updated_at=utcnow()))
