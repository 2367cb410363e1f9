"""Named schema steps, applied in order and recorded in `schema_migrations`.

Each step is frozen DDL written with Alembic's operations (portable across SQLAlchemy
backends, SQLite's ALTER limits handled by batch mode). Add a step; never edit one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from myllm.registry.schema import utcnow

if TYPE_CHECKING:
    from alembic.operations import Operations


def _0001_models(op: Operations) -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("digest", sa.String(64), nullable=False, index=True),
        sa.Column("blob_path", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("architecture", sa.String(64), nullable=False),
        sa.Column("family", sa.String(64), nullable=False),
        sa.Column("parameter_count", sa.BigInteger, nullable=False),
        sa.Column("parameter_size", sa.String(32), nullable=False),
        sa.Column("quantization", sa.String(32), nullable=False),
        sa.Column("context_length", sa.Integer, nullable=False),
        sa.Column("embedding_length", sa.Integer),
        sa.Column("vocab_size", sa.Integer, nullable=False),
        sa.Column("chat_template", sa.Text),
        sa.Column("license", sa.Text),
        sa.Column("parameters", sa.JSON, nullable=False),
        sa.Column("system", sa.Text),
        sa.Column("template_override", sa.Text),
        sa.Column("source", sa.Text),
        sa.Column("details", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("modified_at", sa.DateTime(timezone=True), nullable=False),
    )


def _0002_sessions(op: Operations) -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "session_messages",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "session_id", sa.String(128), sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False, index=True
        ),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("tokens", sa.Integer),
        sa.Column("model", sa.String(255)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def _0003_model_messages(op: Operations) -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("messages", sa.JSON))


def _0004_blob_checks(op: Operations) -> None:
    op.create_table(
        "blob_checks",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("mtime_ns", sa.BigInteger, nullable=False),
        sa.Column("ok", sa.Boolean, nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
    )


def _0005_responses(op: Operations) -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "session_id", sa.String(128), sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False, index=True
        ),
        sa.Column("upto", sa.Integer, nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def _0006_session_owner(op: Operations) -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("owner", sa.String(64)))
        batch.create_index("ix_sessions_owner", ["owner"])


def _0007_replicas(op: Operations) -> None:
    """Several daemons over one database: where a blob lies, and whether it was checked, are
    each machine's own facts (the path follows from the digest, the check is kept beside the
    blob), and a turn's claim on its session is shared. A message's place in its session is
    unique, so two writers can never interleave one session."""
    with op.batch_alter_table("models") as batch:
        batch.drop_column("blob_path")
    op.drop_table("blob_checks")
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("turn_holder", sa.String(64)))
        batch.add_column(sa.Column("turn_until", sa.Float))
    with op.batch_alter_table("session_messages") as batch:
        batch.create_unique_constraint("uq_session_messages_seq", ["session_id", "seq"])
    op.create_table(
        "choices",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def _0008_session_scopes(op: Operations) -> None:
    """A session a key made is kept under that key's scope (`id@` and 16 hex digits of the key's
    hash: `registry/sessions.py` `stored_id`), so two keys' ids never meet. Sessions made
    before are moved there, their messages and responses with them (ids over 111 characters,
    which the scoped form cannot hold, stay where they are). No schema change."""
    cols = ("id", "kind", "model", "owner", "created_at", "updated_at", "turn_holder", "turn_until")
    sessions = sa.table("sessions", *(sa.column(c, sa.String) for c in cols))
    scoped = sessions.c.id + "@" + sa.func.substr(sessions.c.owner, 1, 16)
    movable = sa.and_(sessions.c.owner.is_not(None), ~sessions.c.id.contains("@"), sa.func.length(sessions.c.id) <= 111)
    op.execute(sa.insert(sessions).from_select(cols, sa.select(scoped, *(sessions.c[c] for c in cols[1:])).where(movable)))
    for name in ("session_messages", "responses"):
        child = sa.table(name, sa.column("session_id", sa.String))
        old = sa.select(sessions.c.id).where(movable)
        new = sa.select(scoped).where(sessions.c.id == child.c.session_id).scalar_subquery()
        op.execute(sa.update(child).where(child.c.session_id.in_(old)).values(session_id=new))
    op.execute(sa.delete(sessions).where(movable))


def _0009_message_thinking(op: Operations) -> None:
    """A thinking model's thinking, kept apart from the answer it preceded."""
    with op.batch_alter_table("session_messages") as batch:
        batch.add_column(sa.Column("thinking", sa.Text))


def _0010_model_projector(op: Operations) -> None:
    """A multimodal model's projector blob, beside its text model's (null: a text model)."""
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("projector_digest", sa.String(64)))
        batch.add_column(sa.Column("projector_size", sa.BigInteger))
        batch.create_index("ix_models_projector_digest", ["projector_digest"])


def _0011_session_images(op: Operations) -> None:
    """The images of stored messages: each a blob of the store (by digest, never inline), at a
    place in its message's text, so a stored conversation is given to the model as it was sent."""
    op.create_table(
        "session_images",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("message_id", sa.Integer, sa.ForeignKey("session_messages.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("char_at", sa.Integer, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False, index=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("message_id", "position", name="uq_session_images_position"),
    )


def _0012_model_draft(op: Operations) -> None:
    """A model's draft model blob, for speculative decoding (null: none)."""
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("draft_digest", sa.String(64)))
        batch.add_column(sa.Column("draft_size", sa.BigInteger))
        batch.create_index("ix_models_draft_digest", ["draft_digest"])


def _0013_model_adapters(op: Operations) -> None:
    """A model's LoRA adapters (blobs of the store, applied over its own blob)."""
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("adapters", sa.JSON))


MIGRATIONS: list[tuple[str, Callable[[Operations], None]]] = [
    ("0001_models", _0001_models),
    ("0002_sessions", _0002_sessions),
    ("0003_model_messages", _0003_model_messages),
    ("0004_blob_checks", _0004_blob_checks),
    ("0005_responses", _0005_responses),
    ("0006_session_owner", _0006_session_owner),
    ("0007_replicas", _0007_replicas),
    ("0008_session_scopes", _0008_session_scopes),
    ("0009_message_thinking", _0009_message_thinking),
    ("0010_model_projector", _0010_model_projector),
    ("0011_session_images", _0011_session_images),
    ("0012_model_draft", _0012_model_draft),
    ("0013_model_adapters", _0013_model_adapters),
]

_migrations_table = sa.Table(
    "schema_migrations",
    sa.MetaData(),
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)


def applied(conn: Connection) -> list[str]:
    return list(conn.execute(sa.select(_migrations_table.c.name)).scalars())


def migrate(engine: Engine) -> list[str]:
    """Apply pending steps, each in its own transaction; returns the names applied now.

    Alembic is imported only when a step is pending: a daemon opening a database that is
    already current (every start but the first on a new home or after an upgrade) never holds it
    (~10 MB)."""
    with engine.begin() as conn:
        _migrations_table.create(conn, checkfirst=True)
        done = set(applied(conn))
    pending = [(name, step) for name, step in MIGRATIONS if name not in done]
    if not pending:
        return []
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    done_now: list[str] = []
    for name, step in pending:
        with engine.begin() as conn:  # checked again: another daemon may have applied it meanwhile
            if name in applied(conn):
                continue
            step(Operations(MigrationContext.configure(conn)))
            conn.execute(_migrations_table.insert().values(name=name, applied_at=utcnow()))
            done_now.append(name)
    return done_now


def schema_version(engine: Engine) -> str | None:
    with engine.connect() as conn:
        names = applied(conn)
    return names[-1] if names else None
