"""Conversations kept in the registry database. A turn (the new messages and the reply) is
written in one transaction, so a crash never leaves half a turn."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from myllm.errors import InvalidOptions, SessionNotFound
from myllm.registry.schema import MessageRow, SessionRow, utcnow

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True)
class StoredMessage:
    role: str
    content: str
    tokens: int | None
    model: str | None
    created_at: datetime


@dataclass(frozen=True)
class SessionInfo:
    id: str
    kind: str
    model: str
    created_at: datetime
    updated_at: datetime
    message_count: int


def new_session_id() -> str:
    return str(uuid.uuid4())


def check_session_id(session_id: str) -> str:
    if not _ID_RE.fullmatch(session_id):
        raise InvalidOptions(
            "session_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-'", field="session_id"
        )
    return session_id


class SessionStore:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def history(self, session_id: str) -> list[StoredMessage]:
        """The stored messages of a session, oldest first; empty for an unknown id."""
        with self._sessions() as db:
            rows = db.scalars(
                select(MessageRow).where(MessageRow.session_id == session_id).order_by(MessageRow.seq)
            ).all()
            return [StoredMessage(r.role, r.content, r.tokens, r.model, r.created_at) for r in rows]

    def append_turn(
        self, session_id: str, kind: str, model: str, messages: list[tuple[str, str, int | None]]
    ) -> None:
        """Add (role, content, tokens) messages to a session, creating it if needed."""
        with self._sessions.begin() as db:
            row = db.get(SessionRow, session_id)
            now = utcnow()
            if row is None:
                row = SessionRow(id=session_id, kind=kind, model=model, created_at=now, updated_at=now)
                db.add(row)
                db.flush()
            last = db.scalar(select(func.max(MessageRow.seq)).where(MessageRow.session_id == session_id))
            seq = (last or 0) + 1
            for offset, (role, content, tokens) in enumerate(messages):
                db.add(MessageRow(session_id=session_id, seq=seq + offset, role=role, content=content,
                                  tokens=tokens, model=model, created_at=now))
            row.model = model
            row.updated_at = now

    def list(self) -> list[SessionInfo]:
        with self._sessions() as db:
            counts = (
                select(MessageRow.session_id, func.count(MessageRow.id).label("n"))
                .group_by(MessageRow.session_id)
                .subquery()
            )
            rows = db.execute(
                select(SessionRow, func.coalesce(counts.c.n, 0))
                .outerjoin(counts, counts.c.session_id == SessionRow.id)
                .order_by(SessionRow.updated_at.desc())
            ).all()
            return [SessionInfo(s.id, s.kind, s.model, s.created_at, s.updated_at, int(n)) for s, n in rows]

    def get(self, session_id: str) -> tuple[SessionInfo, list[StoredMessage]]:
        with self._sessions() as db:
            row = db.get(SessionRow, session_id)
            if row is None:
                raise SessionNotFound(session_id)
            info = SessionInfo(row.id, row.kind, row.model, row.created_at, row.updated_at, len(row.messages))
        return info, self.history(session_id)

    def delete(self, session_id: str) -> None:
        with self._sessions.begin() as db:
            row = db.get(SessionRow, session_id)
            if row is None:
                raise SessionNotFound(session_id)
            db.delete(row)
