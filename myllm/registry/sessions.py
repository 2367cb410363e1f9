"""Conversations kept in the registry database. A turn (the new messages and the reply) is
written in one transaction, so a crash never leaves half a turn."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from myllm.errors import InvalidOptions, ResponseNotFound, SessionNotFound
from myllm.registry.schema import MessageRow, ResponseRow, SessionRow, utcnow

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


class ResponseStore:
    """OpenAI Responses API responses, kept on the session store's tables: a response's
    conversation is a session's messages up to the response's `upto`. A response continued
    again after it was continued once forks: its messages are copied into a new session, so
    every response keeps exactly the conversation it answered."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def conversation(self, response_id: str) -> tuple[str, list[StoredMessage]]:
        """The session of a stored response and its messages up to that response."""
        with self._sessions() as db:
            row = db.get(ResponseRow, response_id)
            if row is None:
                raise ResponseNotFound(response_id)
            messages = db.scalars(
                select(MessageRow).where(MessageRow.session_id == row.session_id, MessageRow.seq <= row.upto)
                .order_by(MessageRow.seq)
            ).all()
            return row.session_id, [StoredMessage(m.role, m.content, m.tokens, m.model, m.created_at) for m in messages]

    def store(
        self, body: dict[str, Any], previous: str | None, model: str, messages: list[tuple[str, str, int | None]]
    ) -> None:
        """Keep a response (`body`, whose `id` it is) with the messages of its turn, after its
        `previous` response's conversation, in one transaction."""
        now = utcnow()
        with self._sessions.begin() as db:
            session_id, upto = new_session_id(), 0
            if previous is not None:
                before = db.get(ResponseRow, previous)
                if before is None:
                    raise ResponseNotFound(previous)
                last = db.scalar(select(func.max(MessageRow.seq)).where(MessageRow.session_id == before.session_id))
                if last == before.upto:  # the chain's newest response: continue its session
                    session_id, upto = before.session_id, before.upto
                else:
                    self._fork(db, before, session_id, model, now)
                    upto = before.upto
            session = db.get(SessionRow, session_id)
            if session is None:
                session = SessionRow(id=session_id, kind="responses", model=model, created_at=now, updated_at=now)
                db.add(session)
                db.flush()
            for offset, (role, content, tokens) in enumerate(messages, start=1):
                db.add(MessageRow(session_id=session_id, seq=upto + offset, role=role, content=content,
                                  tokens=tokens, model=model, created_at=now))
            session.model, session.updated_at = model, now
            db.add(ResponseRow(id=body["id"], session_id=session_id, upto=upto + len(messages), body=body, created_at=now))

    @staticmethod
    def _fork(db: Session, before: ResponseRow, session_id: str, model: str, now: datetime) -> None:
        db.add(SessionRow(id=session_id, kind="responses", model=model, created_at=now, updated_at=now))
        db.flush()
        for m in db.scalars(
            select(MessageRow).where(MessageRow.session_id == before.session_id, MessageRow.seq <= before.upto)
        ).all():
            db.add(MessageRow(session_id=session_id, seq=m.seq, role=m.role, content=m.content, tokens=m.tokens,
                              model=m.model, created_at=m.created_at))

    def get(self, response_id: str) -> dict[str, Any]:
        with self._sessions() as db:
            row = db.get(ResponseRow, response_id)
            if row is None:
                raise ResponseNotFound(response_id)
            return dict(row.body)

    def delete(self, response_id: str) -> None:
        """Forget a response; its session keeps the turns later responses build on."""
        with self._sessions.begin() as db:
            row = db.get(ResponseRow, response_id)
            if row is None:
                raise ResponseNotFound(response_id)
            db.delete(row)
