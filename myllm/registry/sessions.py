"""Conversations kept in the registry database. A turn (the new messages and the reply) is
written in one transaction, so a crash never leaves half a turn."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, delete, exists, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from myllm.errors import ImageNotFound, InvalidOptions, ResponseNotFound, SessionNotFound, TurnLost
from myllm.registry.db import retried
from myllm.registry.schema import responses, session_images, session_messages, sessions, utcnow
from myllm.registry.session_images import ImageRef, Parts, Placed, joined, split

OWNER_TAG = 16
"""Hex digits of the owner's key hash that scope a stored session id (`stored_id`)."""
MAX_ID = 128 - 1 - OWNER_TAG
"""The longest session id a client may choose: its scoped form fits the 128-character column."""
_ID_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._:-]{{0,{MAX_ID - 1}}}$")
_TAG_RE = re.compile(rf"^(?:[0-9a-f]{{{OWNER_TAG}}})?$")
_UNSCOPED_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
"""A session id kept as given (keys off): the whole column is the id's, as before ids were scoped."""
_msg, _img, _ses = session_messages.c, session_images.c, sessions.c


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
    def of(cls, row: Row[Any], images: Placed) -> StoredMessage:
        """A `session_messages` row and its images (`_messages`)."""
        return cls(row.role, row.content, row.tokens, row.model, row.created_at, row.thinking, images)


NewMessage = tuple[str, Parts, int | None] | tuple[str, Parts, int | None, str | None]
"""(role, content, tokens) of a message to store, and a thinking model's thinking before it. A
content with images holds them as `ImageRef`s, their blobs already written (`SessionImages.keep`)."""


def _add_message(conn: Connection, session_id: str, seq: int, message: NewMessage, model: str, now: datetime) -> None:
    role, content, tokens, *thinking = message
    text, placed = split(content)
    _insert_message(conn, {"session_id": session_id, "seq": seq, "role": role, "content": text, "tokens": tokens,
                           "model": model, "created_at": now, "thinking": thinking[0] if thinking else None}, placed)


def _insert_message(conn: Connection, values: dict[str, Any], placed: Placed) -> None:
    """A `session_messages` row of `values`, then its images' rows, which name its new id."""
    message_id = conn.execute(insert(session_messages).values(**values)).inserted_primary_key[0]
    if placed:
        conn.execute(insert(session_images), [
            {"message_id": message_id, "position": n, "char_at": at, "digest": image.digest, "size": image.size}
            for n, (at, image) in enumerate(placed)])


def _messages(conn: Connection, *where: ColumnElement[bool]) -> list[tuple[Row[Any], Placed]]:
    """The messages `where` picks, by `seq`, each with its images in order: one statement for
    both, grouped here (most messages have none: a second query for them would be one more
    round trip on every turn)."""
    query = (select(session_messages, _img.char_at, _img.digest, _img.size.label("image_size"))
             .outerjoin(session_images, _img.message_id == _msg.id)
             .where(*where).order_by(_msg.seq, _img.position))
    grouped: dict[int, tuple[Row[Any], list[tuple[int, ImageRef]]]] = {}
    for row in conn.execute(query):
        _, images = grouped.setdefault(row.id, (row, []))
        if row.digest is not None:
            images.append((row.char_at, ImageRef(row.digest, row.image_size)))
    return [(message, tuple(images)) for message, images in grouped.values()]


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

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @staticmethod
    def _visible(conn: Connection, key: str, session_id: str, viewer: Viewer) -> Row[Any] | None:
        """The session stored as `key`, None when there is none; `SessionNotFound` when it is
        someone else's (a guard: `resolve` scopes a client's ids to its own key)."""
        row = conn.execute(select(sessions).where(_ses.id == key)).first()
        if row is not None and not viewer.sees(row.owner):
            raise SessionNotFound(session_id)
        return row

    @staticmethod
    def _new(conn: Connection, key: str, session_id: str, kind: str, model: str, viewer: Viewer, **claim: Any) -> None:
        """A new session of `viewer`'s. Only in its own scope: an admin naming another key's
        session that does not exist gets `SessionNotFound`, not a session filed under that key."""
        if key != stored_id(key.partition("@")[0], viewer.key_hash):
            raise SessionNotFound(session_id)
        _insert_session(conn, key, kind, model, viewer.key_hash, utcnow(), **claim)

    def history(self, session_id: str, viewer: Viewer = ADMIN) -> list[StoredMessage]:
        """The stored messages of a session, oldest first; empty for an unknown id."""
        key = resolve(session_id, viewer)
        with self._engine.connect() as conn:
            self._visible(conn, key, session_id, viewer)
            return [StoredMessage.of(row, images) for row, images in _messages(conn, _msg.session_id == key)]

    def claim(self, session_id: str, kind: str, model: str, holder: str, lease: float, viewer: Viewer = ADMIN) -> str | None:
        """Claim the session's next turn for `holder` (one turn's token) until `lease` seconds
        from now, creating the session (owned by `viewer`) if it is new. Returns None when
        claimed, else the holder of the running turn, whose claim has not lapsed. Every daemon
        over the database claims here, so two turns never run on one session at once."""
        key = resolve(session_id, viewer)
        now = time.time()
        try:
            with self._engine.begin() as conn:
                row = self._visible(conn, key, session_id, viewer)
                if row is None:
                    self._new(conn, key, session_id, kind, model, viewer, turn_holder=holder, turn_until=now + lease)
                    return None
                claimed = conn.execute(
                    update(sessions)
                    .where(_ses.id == key, or_(_ses.turn_holder.is_(None), _ses.turn_until < now))
                    .values(turn_holder=holder, turn_until=now + lease)
                ).rowcount
                return None if claimed else (row.turn_holder or "another turn")
        except IntegrityError:  # created by another daemon's claim at the same moment
            return "another turn"

    def renew(self, holders: list[str], lease: float) -> None:
        """Extend the running turns' claims (a daemon renews its own while they run)."""
        if holders:
            with self._engine.begin() as conn:
                conn.execute(update(sessions).where(_ses.turn_holder.in_(holders))
                             .values(turn_until=time.time() + lease))

    def release(self, session_id: str, holder: str, viewer: Viewer = ADMIN) -> None:
        """End a turn that stored nothing (it failed, or its client left): the claim is freed,
        and a session its claim created, still without messages, is removed again."""
        key = resolve(session_id, viewer)
        with self._engine.begin() as conn:
            _end_claim(conn, key, holder)
            conn.execute(delete(sessions).where(
                _ses.id == key, _ses.turn_holder.is_(None), ~exists().where(_msg.session_id == key)))

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
        with self._engine.begin() as conn:
            row = self._visible(conn, key, session_id, viewer)
            now = utcnow()
            if holder is not None and not _end_claim(conn, key, holder):
                raise TurnLost(session_id)
            if row is None:
                self._new(conn, key, session_id, kind, model, viewer)
            last = conn.scalar(select(func.max(_msg.seq)).where(_msg.session_id == key))
            seq = (last or 0) + 1
            for offset, message in enumerate(messages):
                _add_message(conn, key, seq + offset, message, model, now)
            conn.execute(update(sessions).where(_ses.id == key).values(model=model, updated_at=now))

    def list(self, viewer: Viewer = ADMIN) -> list[SessionInfo]:
        with self._engine.connect() as conn:
            counts = (
                select(_msg.session_id, func.count(_msg.id).label("n"))
                .group_by(_msg.session_id)
                .subquery()
            )
            query = (
                select(sessions, func.coalesce(counts.c.n, 0).label("message_count"))
                .outerjoin(counts, counts.c.session_id == _ses.id)
                .order_by(_ses.updated_at.desc())
            )
            if not viewer.admin:
                query = query.where(_ses.owner == viewer.key_hash)
            rows = conn.execute(query).all()
            first = (
                select(_msg.session_id, func.min(_msg.seq).label("seq"))
                .where(_msg.role == "user").group_by(_msg.session_id).subquery()
            )
            previews = dict(conn.execute(
                select(_msg.session_id, func.substr(_msg.content, 1, 100))
                .join(first, (first.c.session_id == _msg.session_id) & (first.c.seq == _msg.seq))
            ).all())
            return [SessionInfo(shown_id(s.id, s.owner, viewer), s.kind, s.model, s.created_at, s.updated_at,
                                int(s.message_count), previews.get(s.id))
                    for s in rows]

    def get(self, session_id: str, viewer: Viewer = ADMIN) -> tuple[SessionInfo, list[StoredMessage]]:
        key = resolve(session_id, viewer)
        with self._engine.connect() as conn:
            row = self._visible(conn, key, session_id, viewer)
            if row is None:
                raise SessionNotFound(session_id)
            count = conn.scalar(select(func.count()).select_from(session_messages).where(_msg.session_id == key))
            info = SessionInfo(session_id, row.kind, row.model, row.created_at, row.updated_at, int(count or 0))
        return info, self.history(session_id, viewer)

    def image(self, session_id: str, digest: str, viewer: Viewer = ADMIN) -> None:
        """Whether `viewer` may see the image `digest` (sha256 hex): one of the session's
        messages holds it. `SessionNotFound` or `ImageNotFound` otherwise."""
        key = resolve(session_id, viewer)
        with self._engine.connect() as conn:
            if self._visible(conn, key, session_id, viewer) is None:
                raise SessionNotFound(session_id)
            held = conn.scalar(select(_img.id).join(session_messages, _img.message_id == _msg.id)
                               .where(_msg.session_id == key, _img.digest == digest).limit(1))
        if held is None:
            raise ImageNotFound(f"session '{session_id}' holds no image sha256:{digest[:64]}")

    def delete(self, session_id: str, viewer: Viewer = ADMIN) -> set[str]:
        """Delete a session; returns the digests of its images, for `SessionImages.let_go` (the
        blobs nothing else uses go)."""
        key = resolve(session_id, viewer)
        with self._engine.begin() as conn:
            row = self._visible(conn, key, session_id, viewer)
            if row is None:
                raise SessionNotFound(session_id)
            digests = set(conn.scalars(select(_img.digest).join(session_messages, _img.message_id == _msg.id)
                                       .where(_msg.session_id == key)))
            # its messages, their images and its responses go with it (ON DELETE CASCADE)
            conn.execute(delete(sessions).where(_ses.id == key))
        return digests


def _end_claim(conn: Connection, session_id: str, holder: str) -> bool:
    """End `holder`'s claim on a session inside the caller's transaction; False when it no
    longer has one. On PostgreSQL the update locks the row until the commit, so a daemon that
    claims next sees this turn's messages."""
    return bool(conn.execute(
        update(sessions).where(_ses.id == session_id, _ses.turn_holder == holder)
        .values(turn_holder=None, turn_until=None)
    ).rowcount)


def _insert_session(conn: Connection, session_id: str, kind: str, model: str, owner: str | None, now: datetime,
                    **claim: Any) -> None:
    """A new session's row as it is stored (`session_id` already scoped), before its messages:
    a conversation's, a chain of responses' or a fork's; `claim`: its first turn's claim."""
    conn.execute(insert(sessions).values(id=session_id, kind=kind, model=model, owner=owner, created_at=now,
                                         updated_at=now, **claim))


class ResponseStore:
    """OpenAI Responses API responses, kept on the session store's tables: a response's
    conversation is a session's messages up to the response's `upto`. A response continued
    again after it was continued once forks: its messages are copied into a new session, so
    every response keeps exactly the conversation it answered."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @staticmethod
    def _row(conn: Connection, response_id: str, viewer: Viewer) -> Row[Any]:
        """The response with its session's `owner`, if it exists and its conversation is the viewer's."""
        row = conn.execute(select(responses, _ses.owner).join(sessions, _ses.id == responses.c.session_id)
                           .where(responses.c.id == response_id)).first()
        if row is None or not viewer.sees(row.owner):
            raise ResponseNotFound(response_id)
        return row

    def conversation(self, response_id: str, viewer: Viewer = ADMIN) -> tuple[str, list[StoredMessage]]:
        """The session of a stored response (its id as `viewer` names it) and its messages up to
        that response."""
        with self._engine.connect() as conn:
            row = self._row(conn, response_id, viewer)
            messages = _messages(conn, _msg.session_id == row.session_id, _msg.seq <= row.upto)
            return (shown_id(row.session_id, row.owner, viewer),
                    [StoredMessage.of(m, images) for m, images in messages])

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
        with self._engine.begin() as conn:
            session_id, upto = stored_id(new_session_id(), viewer.key_hash), 0
            if previous is None:
                _insert_session(conn, session_id, "responses", model, viewer.key_hash, now)
            else:
                before = self._row(conn, previous, viewer)
                if holder is not None and not _end_claim(conn, before.session_id, holder):
                    raise TurnLost(before.session_id)
                last = conn.scalar(select(func.max(_msg.seq)).where(_msg.session_id == before.session_id))
                if last == before.upto:  # the chain's newest response: continue its session
                    session_id, upto = before.session_id, before.upto
                    conn.execute(update(sessions).where(_ses.id == session_id).values(model=model, updated_at=now))
                else:
                    self._fork(conn, before, session_id, model, viewer.key_hash, now)
                    upto = before.upto
            for offset, message in enumerate(messages, start=1):
                _add_message(conn, session_id, upto + offset, message, model, now)
            conn.execute(insert(responses).values(id=body["id"], session_id=session_id, upto=upto + len(messages),
                                                  body=body, created_at=now))

    @staticmethod
    def _fork(conn: Connection, before: Row[Any], session_id: str, model: str, owner: str | None,
              now: datetime) -> None:
        """A new session holding a copy of `before`'s conversation (its messages and their images)."""
        _insert_session(conn, session_id, "responses", model, owner, now)
        for m, placed in _messages(conn, _msg.session_id == before.session_id, _msg.seq <= before.upto):
            _insert_message(conn, {"session_id": session_id, "seq": m.seq, "role": m.role, "content": m.content,
                                   "tokens": m.tokens, "model": m.model, "created_at": m.created_at,
                                   "thinking": m.thinking}, placed)

    def get(self, response_id: str, viewer: Viewer = ADMIN) -> dict[str, Any]:
        with self._engine.connect() as conn:
            return dict(self._row(conn, response_id, viewer).body)

    def delete(self, response_id: str, viewer: Viewer = ADMIN) -> None:
        """Forget a response; its session keeps the turns later responses build on."""
        with self._engine.begin() as conn:
            self._row(conn, response_id, viewer)
            conn.execute(delete(responses).where(responses.c.id == response_id))
