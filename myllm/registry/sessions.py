"""Conversations kept in the registry database. A turn (the new messages and the reply) is
written in one transaction, so a crash never leaves half a turn."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, delete, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload, sessionmaker

from myllm.errors import ImageNotFound, InvalidOptions, ResponseNotFound, SessionNotFound, TurnLost
from myllm.registry.db import retried
from myllm.registry.schema import MessageRow, ResponseRow, SessionImageRow, SessionRow, utcnow
from myllm.registry.session_images import ImageRef, Parts, Placed, joined, split

OWNER_TAG = 16
"""Hex digits of the owner's key hash that scope a stored session id (`stored_id`)."""
MAX_ID = 128 - 1 - OWNER_TAG
"""The longest session id a client may choose: its scoped form fits the 128-character column."""
_ID_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._:-]{{0,{MAX_ID - 1}}}$")
_TAG_RE = re.compile(rf"^(?:[0-9a-f]{{{OWNER_TAG}}})?$")
_UNSCOPED_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
"""A session id kept as given (keys off): the whole column is the id's, as before ids were scoped."""


@dataclass(frozen=True)
class StoredMessage:
    role: str
    content: str
    """Its text (without its images)."""
    tokens: int | None
    model: str | None
    created_at: datetime
    thinking: str | None = None
    images: Placed = ()
    """The images sent in it, in order, each after the length of `content` before it."""

    @property
    def parts(self) -> Parts:
        """Its content as sent: the text and images in order."""
        return joined(self.content, self.images)

    @classmethod
    def of(cls, row: MessageRow) -> StoredMessage:
        return cls(row.role, row.content, row.tokens, row.model, row.created_at, row.thinking,
                   tuple((i.char_at, ImageRef(i.digest, i.size)) for i in row.images))


NewMessage = tuple[str, Parts, int | None] | tuple[str, Parts, int | None, str | None]
"""(role, content, tokens) of a message to store, and a thinking model's thinking before it. A
content with images holds them as `ImageRef`s, their blobs already written (`SessionImages.keep`)."""


def _message_row(session_id: str, seq: int, message: NewMessage, model: str, now: datetime) -> MessageRow:
    role, content, tokens, *thinking = message
    text, placed = split(content)
    return MessageRow(session_id=session_id, seq=seq, role=role, content=text, tokens=tokens, model=model,
                      created_at=now, thinking=thinking[0] if thinking else None, images=_image_rows(placed))


def _with_images() -> Select[tuple[MessageRow]]:
    """Messages with their images, in the same statement (most have none: a second query for
    them would be one more round trip on every turn)."""
    return select(MessageRow).options(joinedload(MessageRow.images))


def _image_rows(placed: Placed) -> list[SessionImageRow]:
    return [SessionImageRow(position=n, char_at=at, digest=image.digest, size=image.size)
            for n, (at, image) in enumerate(placed)]


@dataclass(frozen=True)
class Viewer:
    """Who asks for a conversation: the hash of their API key, and whether it is an admin's.
    A conversation is theirs when they made it; admins see every one. To anyone else it does
    not exist (404, the same answer as for an id never used)."""

    key_hash: str | None
    admin: bool

    def sees(self, owner: str | None) -> bool:
        return self.admin or (owner is not None and owner == self.key_hash)


ADMIN = Viewer(None, True)
"""The viewer while keys are off (and the CLI's): everything."""


@dataclass(frozen=True)
class SessionInfo:
    id: str
    kind: str
    model: str
    created_at: datetime
    updated_at: datetime
    message_count: int
    preview: str | None = None
    """The start of its first user message (what a list of conversations shows)."""


def new_session_id() -> str:
    return str(uuid.uuid4())


def check_session_id(session_id: str, viewer: Viewer | None = None) -> str:
    """A client's session id as given, if well formed (400 otherwise); with `viewer`, an admin's
    scoped id (see `resolve`) passes too."""
    if viewer is not None:
        resolve(session_id, viewer)
    elif not _ID_RE.fullmatch(session_id):
        raise InvalidOptions(
            f"session_id must be 1-{MAX_ID} characters of letters, digits, '.', '_', ':' or '-'", field="session_id"
        )
    return session_id


def stored_id(session_id: str, owner: str | None) -> str:
    """Where a client's session id is kept: scoped to its owner's key (`id@tag`), so two keys'
    "s1" are two sessions and neither can take or probe the other's. Sessions made while keys
    are off (no owner) keep the id as given."""
    return session_id if owner is None else f"{session_id}@{owner[:OWNER_TAG]}"


def resolve(session_id: str, viewer: Viewer) -> str:
    """The stored id of the session `session_id` names for `viewer`: one of its own, or, for an
    admin, anyone's by the scoped id the admin's list shows (`id@tag`; `id@` for one made while
    keys were off). A client's id is checked here (400 when malformed)."""
    name, at, tag = session_id.partition("@")
    if at and viewer.admin and _ID_RE.fullmatch(name) and _TAG_RE.fullmatch(tag):
        return name if not tag else session_id
    if viewer.key_hash is None and _UNSCOPED_RE.fullmatch(session_id):
        return session_id
    return stored_id(check_session_id(session_id), viewer.key_hash)


def shown_id(stored: str, owner: str | None, viewer: Viewer) -> str:
    """A stored session's id as `viewer` names it (the inverse of `resolve`)."""
    name = stored.rpartition("@")[0] if owner is not None and "@" in stored else stored
    if owner == viewer.key_hash:
        return name
    return f"{name}@{owner[:OWNER_TAG] if owner else ''}"


class SessionStore:
    """Every method takes a session id as its caller names it and the `Viewer` asking; where it
    is kept is `resolve`'s business."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    @staticmethod
    def _visible(db: Session, key: str, session_id: str, viewer: Viewer) -> SessionRow | None:
        """The session stored as `key`, None when there is none; `SessionNotFound` when it is
        someone else's (a guard: `resolve` scopes a client's ids to its own key)."""
        row = db.get(SessionRow, key)
        if row is not None and not viewer.sees(row.owner):
            raise SessionNotFound(session_id)
        return row

    @staticmethod
    def _new(db: Session, key: str, session_id: str, kind: str, model: str, viewer: Viewer, **claim: Any) -> SessionRow:
        """A new session of `viewer`'s. Only in its own scope: an admin naming another key's
        session that does not exist gets `SessionNotFound`, not a session filed under that key."""
        if key != stored_id(key.partition("@")[0], viewer.key_hash):
            raise SessionNotFound(session_id)
        row = SessionRow(id=key, kind=kind, model=model, owner=viewer.key_hash, created_at=utcnow(), updated_at=utcnow(),
                         **claim)
        db.add(row)
        return row

    def history(self, session_id: str, viewer: Viewer = ADMIN) -> list[StoredMessage]:
        """The stored messages of a session, oldest first; empty for an unknown id."""
        key = resolve(session_id, viewer)
        with self._sessions() as db:
            self._visible(db, key, session_id, viewer)
            rows = db.scalars(_with_images().where(MessageRow.session_id == key).order_by(MessageRow.seq)).unique().all()
            return [StoredMessage.of(r) for r in rows]

    def claim(self, session_id: str, kind: str, model: str, holder: str, lease: float, viewer: Viewer = ADMIN) -> str | None:
        """Claim the session's next turn for `holder` (one turn's token) until `lease` seconds
        from now, creating the session (owned by `viewer`) if it is new. Returns None when
        claimed, else the holder of the running turn, whose claim has not lapsed. Every daemon
        over the database claims here, so two turns never run on one session at once."""
        key = resolve(session_id, viewer)
        now = time.time()
        try:
            with self._sessions.begin() as db:
                row = self._visible(db, key, session_id, viewer)
                if row is None:
                    self._new(db, key, session_id, kind, model, viewer, turn_holder=holder, turn_until=now + lease)
                    return None
                claimed = db.execute(
                    update(SessionRow)
                    .where(SessionRow.id == key,
                           or_(SessionRow.turn_holder.is_(None), SessionRow.turn_until < now))
                    .values(turn_holder=holder, turn_until=now + lease)
                ).rowcount
                return None if claimed else (row.turn_holder or "another turn")
        except IntegrityError:  # created by another daemon's claim at the same moment
            return "another turn"

    def renew(self, holders: list[str], lease: float) -> None:
        """Extend the running turns' claims (a daemon renews its own while they run)."""
        if holders:
            with self._sessions.begin() as db:
                db.execute(update(SessionRow).where(SessionRow.turn_holder.in_(holders))
                           .values(turn_until=time.time() + lease))

    def release(self, session_id: str, holder: str, viewer: Viewer = ADMIN) -> None:
        """End a turn that stored nothing (it failed, or its client left): the claim is freed,
        and a session its claim created, still without messages, is removed again."""
        key = resolve(session_id, viewer)
        with self._sessions.begin() as db:
            _end_claim(db, key, holder)
            db.execute(delete(SessionRow).where(
                SessionRow.id == key, SessionRow.turn_holder.is_(None),
                ~exists().where(MessageRow.session_id == key)))

    @retried
    def append_turn(
        self, session_id: str, kind: str, model: str, messages: list[NewMessage], viewer: Viewer = ADMIN,
        holder: str | None = None,
    ) -> None:
        """Add (role, content, tokens[, thinking]) messages to a session, creating it (owned by `viewer`) if
        needed. With `holder` (the turn's claim, see `claim`) the claim is checked and ended in
        the same transaction: a turn whose claim lapsed while another turn took the session is
        `TurnLost`, never interleaved with that turn."""
        key = resolve(session_id, viewer)
        with self._sessions.begin() as db:
            row = self._visible(db, key, session_id, viewer)
            now = utcnow()
            if holder is not None and not _end_claim(db, key, holder):
                raise TurnLost(session_id)
            if row is None:
                row = self._new(db, key, session_id, kind, model, viewer)
                db.flush()
            last = db.scalar(select(func.max(MessageRow.seq)).where(MessageRow.session_id == key))
            seq = (last or 0) + 1
            for offset, message in enumerate(messages):
                db.add(_message_row(key, seq + offset, message, model, now))
            row.model = model
            row.updated_at = now

    def list(self, viewer: Viewer = ADMIN) -> list[SessionInfo]:
        with self._sessions() as db:
            counts = (
                select(MessageRow.session_id, func.count(MessageRow.id).label("n"))
                .group_by(MessageRow.session_id)
                .subquery()
            )
            query = (
                select(SessionRow, func.coalesce(counts.c.n, 0))
                .outerjoin(counts, counts.c.session_id == SessionRow.id)
                .order_by(SessionRow.updated_at.desc())
            )
            if not viewer.admin:
                query = query.where(SessionRow.owner == viewer.key_hash)
            rows = db.execute(query).all()
            first = (
                select(MessageRow.session_id, func.min(MessageRow.seq).label("seq"))
                .where(MessageRow.role == "user").group_by(MessageRow.session_id).subquery()
            )
            previews = dict(db.execute(
                select(MessageRow.session_id, func.substr(MessageRow.content, 1, 100))
                .join(first, (first.c.session_id == MessageRow.session_id) & (first.c.seq == MessageRow.seq))
            ).all())
            return [SessionInfo(shown_id(s.id, s.owner, viewer), s.kind, s.model, s.created_at, s.updated_at, int(n),
                                previews.get(s.id))
                    for s, n in rows]

    def get(self, session_id: str, viewer: Viewer = ADMIN) -> tuple[SessionInfo, list[StoredMessage]]:
        key = resolve(session_id, viewer)
        with self._sessions() as db:
            row = self._visible(db, key, session_id, viewer)
            if row is None:
                raise SessionNotFound(session_id)
            info = SessionInfo(session_id, row.kind, row.model, row.created_at, row.updated_at, len(row.messages))
        return info, self.history(session_id, viewer)

    def image(self, session_id: str, digest: str, viewer: Viewer = ADMIN) -> None:
        """Whether `viewer` may see the image `digest` (sha256 hex): one of the session's
        messages holds it. `SessionNotFound` or `ImageNotFound` otherwise."""
        key = resolve(session_id, viewer)
        with self._sessions() as db:
            if self._visible(db, key, session_id, viewer) is None:
                raise SessionNotFound(session_id)
            held = db.scalar(select(SessionImageRow.id).join(MessageRow, SessionImageRow.message_id == MessageRow.id)
                             .where(MessageRow.session_id == key, SessionImageRow.digest == digest).limit(1))
        if held is None:
            raise ImageNotFound(f"session '{session_id}' holds no image sha256:{digest[:64]}")

    def delete(self, session_id: str, viewer: Viewer = ADMIN) -> set[str]:
        """Delete a session; returns the digests of its images, for `SessionImages.let_go` (the
        blobs nothing else uses go)."""
        key = resolve(session_id, viewer)
        with self._sessions.begin() as db:
            row = self._visible(db, key, session_id, viewer)
            if row is None:
                raise SessionNotFound(session_id)
            digests = set(db.scalars(select(SessionImageRow.digest)
                                     .join(MessageRow, SessionImageRow.message_id == MessageRow.id)
                                     .where(MessageRow.session_id == key)))
            db.delete(row)
        return digests


def _end_claim(db: Session, session_id: str, holder: str) -> bool:
    """End `holder`'s claim on a session inside the caller's transaction; False when it no
    longer has one. On PostgreSQL the update locks the row until the commit, so a daemon that
    claims next sees this turn's messages."""
    return bool(db.execute(
        update(SessionRow).where(SessionRow.id == session_id, SessionRow.turn_holder == holder)
        .values(turn_holder=None, turn_until=None)
    ).rowcount)


class ResponseStore:
    """OpenAI Responses API responses, kept on the session store's tables: a response's
    conversation is a session's messages up to the response's `upto`. A response continued
    again after it was continued once forks: its messages are copied into a new session, so
    every response keeps exactly the conversation it answered."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    @staticmethod
    def _row(db: Session, response_id: str, viewer: Viewer) -> ResponseRow:
        """The response, if it exists and its conversation is the viewer's."""
        row = db.get(ResponseRow, response_id)
        if row is None or not viewer.sees(db.get(SessionRow, row.session_id).owner):  # type: ignore[union-attr]
            raise ResponseNotFound(response_id)
        return row

    def conversation(self, response_id: str, viewer: Viewer = ADMIN) -> tuple[str, list[StoredMessage]]:
        """The session of a stored response (its id as `viewer` names it) and its messages up to
        that response."""
        with self._sessions() as db:
            row = self._row(db, response_id, viewer)
            messages = db.scalars(
                _with_images().where(MessageRow.session_id == row.session_id, MessageRow.seq <= row.upto)
                .order_by(MessageRow.seq)
            ).unique().all()
            owner = db.get(SessionRow, row.session_id).owner  # type: ignore[union-attr]
            return (shown_id(row.session_id, owner, viewer),
                    [StoredMessage.of(m) for m in messages])

    @retried
    def store(
        self, body: dict[str, Any], previous: str | None, model: str, messages: list[NewMessage],
        viewer: Viewer = ADMIN, holder: str | None = None,
    ) -> None:
        """Keep a response (`body`, whose `id` it is) with the messages of its turn, after its
        `previous` response's conversation, in one transaction; a new chain is `viewer`'s.
        `holder`: the turn's claim on the previous response's session, checked and ended here
        as `SessionStore.append_turn` does."""
        now = utcnow()
        with self._sessions.begin() as db:
            session_id, upto = stored_id(new_session_id(), viewer.key_hash), 0
            if previous is not None:
                before = self._row(db, previous, viewer)
                if holder is not None and not _end_claim(db, before.session_id, holder):
                    raise TurnLost(before.session_id)
                last = db.scalar(select(func.max(MessageRow.seq)).where(MessageRow.session_id == before.session_id))
                if last == before.upto:  # the chain's newest response: continue its session
                    session_id, upto = before.session_id, before.upto
                else:
                    self._fork(db, before, session_id, model, viewer.key_hash, now)
                    upto = before.upto
            session = db.get(SessionRow, session_id)
            if session is None:
                session = SessionRow(id=session_id, kind="responses", model=model, owner=viewer.key_hash,
                                     created_at=now, updated_at=now)
                db.add(session)
                db.flush()
            for offset, message in enumerate(messages, start=1):
                db.add(_message_row(session_id, upto + offset, message, model, now))
            session.model, session.updated_at = model, now
            db.add(ResponseRow(id=body["id"], session_id=session_id, upto=upto + len(messages), body=body, created_at=now))

    @staticmethod
    def _fork(db: Session, before: ResponseRow, session_id: str, model: str, owner: str | None, now: datetime) -> None:
        db.add(SessionRow(id=session_id, kind="responses", model=model, owner=owner, created_at=now, updated_at=now))
        db.flush()
        for m in db.scalars(
            _with_images().where(MessageRow.session_id == before.session_id, MessageRow.seq <= before.upto)
        ).unique().all():
            placed = tuple((i.char_at, ImageRef(i.digest, i.size)) for i in m.images)
            db.add(MessageRow(session_id=session_id, seq=m.seq, role=m.role, content=m.content, tokens=m.tokens,
                              model=m.model, created_at=m.created_at, thinking=m.thinking, images=_image_rows(placed)))

    def get(self, response_id: str, viewer: Viewer = ADMIN) -> dict[str, Any]:
        with self._sessions() as db:
            return dict(self._row(db, response_id, viewer).body)

    def delete(self, response_id: str, viewer: Viewer = ADMIN) -> None:
        """Forget a response; its session keeps the turns later responses build on."""
        with self._sessions.begin() as db:
            db.delete(self._row(db, response_id, viewer))
