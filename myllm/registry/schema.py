"""ORM tables of the registry database."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class ModelRow(Base):
    """One registered name. Several names may point at one blob (`digest`)."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True, nullable=False)
    digest: Mapped[str] = mapped_column(String(64), index=True, nullable=False)
    """The blob's sha256: its file is `BlobStore.path(digest)` on each machine (a database
    shared by several daemons holds no machine's paths)."""
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    projector_digest: Mapped[str | None] = mapped_column(String(64), index=True)
    """A multimodal model's projector (its `mmproj` GGUF, architecture `clip`): a second blob of
    the store, shared like the first by every name that uses it; None for a text model."""
    projector_size: Mapped[int | None] = mapped_column(BigInteger)
    adapters: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    """LoRA adapters applied to the model, in order: blobs of the store, [{"digest", "size"}]
    (a Modelfile's ADAPTER lines; registry/adapter_check.py). None: the base model alone."""
    draft_digest: Mapped[str | None] = mapped_column(String(64), index=True)
    """The model's draft model for speculative decoding (Modelfile `DRAFT`; registry/drafts.py): the
    blob of a registered chat model of the same vocabulary, kept as long as this row names it."""
    draft_size: Mapped[int | None] = mapped_column(BigInteger)
    architecture: Mapped[str] = mapped_column(String(64), nullable=False)
    family: Mapped[str] = mapped_column(String(64), nullable=False)
    parameter_count: Mapped[int] = mapped_column(BigInteger, nullable=False)
    parameter_size: Mapped[str] = mapped_column(String(32), nullable=False)
    quantization: Mapped[str] = mapped_column(String(32), nullable=False)
    context_length: Mapped[int] = mapped_column(Integer, nullable=False)
    embedding_length: Mapped[int | None] = mapped_column(Integer)
    vocab_size: Mapped[int] = mapped_column(Integer, nullable=False)
    chat_template: Mapped[str | None] = mapped_column(Text)
    license: Mapped[str | None] = mapped_column(Text)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    system: Mapped[str | None] = mapped_column(Text)
    template_override: Mapped[str | None] = mapped_column(Text)
    messages: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)
    """Seed conversation (Modelfile MESSAGE lines), put before every chat's own messages."""
    source: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    modified_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, default=utcnow, onupdate=utcnow
    )

    @property
    def vision(self) -> bool:
        """The model takes images: it has a projector."""
        return self.projector_digest is not None

    @property
    def kind(self) -> str:
        """`chat`, `embedding` or `reranking` (registry/gguf_meta.py `model_kind`, read at
        registration; a row registered before kinds were recorded is a `chat` model, as it was
        treated then)."""
        return str((self.details or {}).get("kind", "chat"))

    @property
    def template(self) -> str | None:
        """The chat template in force: the registry's override, else the file's own."""
        return self.template_override or self.chat_template

    @property
    def shown_source(self) -> str | None:
        """`source` as answers give it: a local file by its name alone (`file:model.gguf`), since
        where it lay on the machine that pulled it is no client's business."""
        if self.source and self.source.startswith("file:"):
            return "file:" + self.source[5:].replace("\\", "/").rsplit("/", 1)[-1]
        return self.source


class SessionRow(Base):
    """A conversation kept across requests (and restarts): chat or generate history."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default="chat")
    model: Mapped[str] = mapped_column(String(255), nullable=False)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)
    """The sha256 (hex) of the API key that made it; None: made while keys were off (admins')."""
    turn_holder: Mapped[str | None] = mapped_column(String(64))
    """The daemon running a turn on this session now (its `SessionStore` holder token), if any."""
    turn_until: Mapped[float | None] = mapped_column(Float)
    """When that claim lapses (Unix time) unless its daemon renews it: a daemon that died mid-turn
    holds the session no longer than this."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    messages: Mapped[list[MessageRow]] = relationship(
        back_populates="session", order_by="MessageRow.seq", cascade="all, delete-orphan", passive_deletes=True
    )


class MessageRow(Base):
    __tablename__ = "session_messages"
    __table_args__ = (UniqueConstraint("session_id", "seq", name="uq_session_messages_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("sessions.id", ondelete="CASCADE"), index=True, nullable=False
    )
    seq: Mapped[int] = mapped_column(Integer, nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    tokens: Mapped[int | None] = mapped_column(Integer)
    model: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    thinking: Mapped[str | None] = mapped_column(Text)
    """A thinking model's thinking before this (assistant) message's content."""
    session: Mapped[SessionRow] = relationship(back_populates="messages")
    images: Mapped[list[SessionImageRow]] = relationship(
        order_by="SessionImageRow.position", cascade="all, delete-orphan", passive_deletes=True
    )
    """The images sent in this message, in order (its `content` is its text alone)."""


class SessionImageRow(Base):
    """An image of a stored message: its bytes are the blob `digest` of the store (shared with
    any other message or session that sent the same bytes), and `char_at` is where in the
    message's text it was: the text before it is `content[:char_at]`."""

    __tablename__ = "session_images"
    __table_args__ = (UniqueConstraint("message_id", "position", name="uq_session_images_position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("session_messages.id", ondelete="CASCADE"), index=True, nullable=False
    )
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    """Its place among the message's images (0 first)."""
    char_at: Mapped[int] = mapped_column(Integer, nullable=False)
    digest: Mapped[str] = mapped_column(String(64), index=True, nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)


class ResponseRow(Base):
    """A stored OpenAI Responses API response: the session holding its conversation and how far
    into it the response reaches (a chain of responses is one session; a response continued
    twice forks a new one)."""

    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    session_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("sessions.id", ondelete="CASCADE"), index=True, nullable=False
    )
    upto: Mapped[int] = mapped_column(Integer, nullable=False)
    """The `seq` of the last session message this response's conversation holds."""
    body: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    """The response object as it was returned."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class ChoiceRow(Base):
    """A run-time choice every daemon over this database follows (see registry/choices.py)."""

    __tablename__ = "choices"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class MigrationRow(Base):
    """Named schema steps already applied to this database."""

    __tablename__ = "schema_migrations"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    applied_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
