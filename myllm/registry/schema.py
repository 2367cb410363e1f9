"""Tables of the registry database, as SQLAlchemy Core `Table`s (the daemon does without the
ORM: it and its mappers cost ~9 MB of the daemon's memory), and `ModelRow`, a model's row as
the rest of the daemon reads it. The tables are created by `migrations.py`, never from here; a
test compares the two."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    Row,
    String,
    Table,
    Text,
    UniqueConstraint,
)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


metadata = MetaData()

models = Table(
    "models",
    metadata,
    # One registered name. Several names may point at one blob (`digest`).
    Column("id", Integer, primary_key=True),
    Column("name", String(255), unique=True, nullable=False),
    # The blob's sha256: its file is `BlobStore.path(digest)` on each machine (a database
    # shared by several daemons holds no machine's paths).
    Column("digest", String(64), index=True, nullable=False),
    Column("size", BigInteger, nullable=False),
    # A multimodal model's projector (its `mmproj` GGUF, architecture `clip`): a second blob of
    # the store, shared like the first by every name that uses it; None for a text model.
    Column("projector_digest", String(64), index=True),
    Column("projector_size", BigInteger),
    # LoRA adapters applied to the model, in order: blobs of the store, [{"digest", "size"}]
    # (a Modelfile's ADAPTER lines; registry/adapter_check.py). None: the base model alone.
    Column("adapters", JSON),
    # The model's draft model for speculative decoding (Modelfile `DRAFT`; registry/drafts.py): the
    # blob of a registered chat model of the same vocabulary, kept as long as this row names it.
    Column("draft_digest", String(64), index=True),
    Column("draft_size", BigInteger),
    Column("architecture", String(64), nullable=False),
    Column("family", String(64), nullable=False),
    Column("parameter_count", BigInteger, nullable=False),
    Column("parameter_size", String(32), nullable=False),
    Column("quantization", String(32), nullable=False),
    Column("context_length", Integer, nullable=False),
    Column("embedding_length", Integer),
    Column("vocab_size", Integer, nullable=False),
    Column("chat_template", Text),
    Column("license", Text),
    Column("parameters", JSON, nullable=False, default=dict),
    Column("system", Text),
    Column("template_override", Text),
    # Seed conversation (Modelfile MESSAGE lines), put before every chat's own messages.
    Column("messages", JSON),
    Column("source", Text),
    Column("details", JSON, nullable=False, default=dict),
    Column("created_at", DateTime(timezone=True), nullable=False, default=utcnow),
    Column("modified_at", DateTime(timezone=True), nullable=False, default=utcnow, onupdate=utcnow),
)

sessions = Table(
    "sessions",
    metadata,
    # A conversation kept across requests (and restarts): chat or generate history.
    Column("id", String(128), primary_key=True),
    Column("kind", String(16), nullable=False, default="chat"),
    Column("model", String(255), nullable=False),
    # The sha256 (hex) of the API key that made it; None: made while keys were off (admins').
    Column("owner", String(64), index=True),
    # The daemon running a turn on this session now (its `SessionStore` holder token), if any.
    Column("turn_holder", String(64)),
    # When that claim lapses (Unix time) unless its daemon renews it: a daemon that died mid-turn
    # holds the session no longer than this.
    Column("turn_until", Float),
    Column("created_at", DateTime(timezone=True), nullable=False, default=utcnow),
    Column("updated_at", DateTime(timezone=True), nullable=False, default=utcnow),
)

session_messages = Table(
    "session_messages",
    metadata,
    # A session's messages, in `seq` order; deleting the session deletes them (ON DELETE CASCADE).
    Column("id", Integer, primary_key=True),
    Column("session_id", String(128), ForeignKey("sessions.id", ondelete="CASCADE"), index=True, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("role", String(16), nullable=False),
    # Its text alone: its images are rows of `session_images`.
    Column("content", Text, nullable=False),
    Column("tokens", Integer),
    Column("model", String(255)),
    Column("created_at", DateTime(timezone=True), nullable=False, default=utcnow),
    # A thinking model's thinking before this (assistant) message's content.
    Column("thinking", Text),
    UniqueConstraint("session_id", "seq", name="uq_session_messages_seq"),
)

session_images = Table(
    "session_images",
    metadata,
    # An image of a stored message: its bytes are the blob `digest` of the store (shared with
    # any other message or session that sent the same bytes), and `char_at` is where in the
    # message's text it was: the text before it is `content[:char_at]`. Deleting the message
    # deletes it (ON DELETE CASCADE).
    Column("id", Integer, primary_key=True),
    Column("message_id", Integer, ForeignKey("session_messages.id", ondelete="CASCADE"), index=True, nullable=False),
    # Its place among the message's images (0 first).
    Column("position", Integer, nullable=False),
    Column("char_at", Integer, nullable=False),
    Column("digest", String(64), index=True, nullable=False),
    Column("size", BigInteger, nullable=False),
    UniqueConstraint("message_id", "position", name="uq_session_images_position"),
)

responses = Table(
    "responses",
    metadata,
    # A stored OpenAI Responses API response: the session holding its conversation and how far
    # into it the response reaches (a chain of responses is one session; a response continued
    # twice forks a new one).
    Column("id", String(64), primary_key=True),
    Column("session_id", String(128), ForeignKey("sessions.id", ondelete="CASCADE"), index=True, nullable=False),
    # The `seq` of the last session message this response's conversation holds.
    Column("upto", Integer, nullable=False),
    # The response object as it was returned.
    Column("body", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, default=utcnow),
)

choices = Table(
    "choices",
    metadata,
    # A run-time choice every daemon over this database follows (see registry/choices.py).
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, default=utcnow),
)

schema_migrations = Table(
    "schema_migrations",
    metadata,
    # Named schema steps already applied to this database.
    Column("name", String(128), primary_key=True),
    Column("applied_at", DateTime(timezone=True), nullable=False, default=utcnow),
)

_UNSET: Any = None
"""The default of a `ModelRow` column built in Python (tests build partial rows): None until set,
typed as the column reads from the database."""


@dataclass(eq=False)
class ModelRow:
    """One registered name (a row of `models`), as read or about to be written. Mutable: a
    Modelfile's overrides are laid over a row before it is written (store.py `Overrides`)."""

    id: int = _UNSET
    """None until the row is inserted."""
    name: str = _UNSET
    digest: str = _UNSET
    size: int = _UNSET
    projector_digest: str | None = None
    projector_size: int | None = None
    adapters: list[dict[str, Any]] | None = None
    draft_digest: str | None = None
    draft_size: int | None = None
    architecture: str = _UNSET
    family: str = _UNSET
    parameter_count: int = _UNSET
    parameter_size: str = _UNSET
    quantization: str = _UNSET
    context_length: int = _UNSET
    embedding_length: int | None = None
    vocab_size: int = _UNSET
    chat_template: str | None = None
    license: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    template_override: str | None = None
    messages: list[dict[str, str]] | None = None
    source: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utcnow)
    modified_at: datetime = field(default_factory=utcnow)

    @classmethod
    def of(cls, row: Row[Any]) -> ModelRow:
        """The row a `select(models)` read."""
        return cls(**row._mapping)

    def values(self) -> dict[str, Any]:
        """Its columns but `id`, for an INSERT or an UPDATE of `models`."""
        return {c.name: getattr(self, c.name) for c in models.columns if c.name != "id"}

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
