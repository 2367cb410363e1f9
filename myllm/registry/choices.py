"""Choices clients make at run time that every daemon over the database must honour, kept
there rather than in one daemon's memory: today the model the LLM service's and DeepShiva's
`POST /load_model` selected, which their later requests use."""

from __future__ import annotations

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from myllm.registry.schema import choices, utcnow

SERVICE_MODEL = "service_model"
"""The model `POST /load_model` chose."""


class Choices:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def get(self, key: str) -> str | None:
        with self._engine.connect() as conn:
            return conn.scalar(select(choices.c.value).where(choices.c.key == key))

    def put(self, key: str, value: str) -> None:
        """Set `key`: its row updated, or written when there is none yet, in one transaction."""
        with self._engine.begin() as conn:
            values = {"value": value, "updated_at": utcnow()}
            if not conn.execute(update(choices).where(choices.c.key == key).values(**values)).rowcount:
                conn.execute(insert(choices).values(key=key, **values))
