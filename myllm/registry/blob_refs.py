"""What keeps a blob of the store: a model (its GGUF, its projector, its draft model's or its LoRA
adapters) or an image of a stored conversation. Every removal of a blob asks here first (`rm`, a
replaced model, the sweep of
unused blobs, a deleted session's images), so none takes bytes another user still names."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.engine import Connection

from myllm.registry.schema import models, session_images


def blob_in_use(conn: Connection, digest: str) -> bool:
    m = models.c
    if conn.scalar(select(m.id).where(or_(m.digest == digest, m.projector_digest == digest,
                                          m.draft_digest == digest)).limit(1)) is not None:
        return True
    if digest in _adapter_digests(conn):
        return True
    return conn.scalar(select(session_images.c.id).where(session_images.c.digest == digest).limit(1)) is not None


def used_digests(conn: Connection) -> set[str]:
    m = models.c
    used = set(conn.scalars(select(m.digest).distinct()))
    used.update(conn.scalars(select(m.projector_digest).where(m.projector_digest.is_not(None)).distinct()))
    used.update(conn.scalars(select(m.draft_digest).where(m.draft_digest.is_not(None)).distinct()))
    used.update(conn.scalars(select(session_images.c.digest).distinct()))
    return used | _adapter_digests(conn)


def _adapter_digests(conn: Connection) -> set[str]:
    """The LoRA adapters' blobs (a JSON list per model, read here: few models have any)."""
    lists = conn.scalars(select(models.c.adapters).where(models.c.adapters.is_not(None)))
    return {adapter["digest"] for adapters in lists for adapter in adapters or ()}
