"""What keeps a blob of the store: a model (its GGUF, its projector, its draft model's or its LoRA
adapters) or an image of a stored conversation. Every removal of a blob asks here first (`rm`, a
replaced model, the sweep of
unused blobs, a deleted session's images), so none takes bytes another user still names."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from myllm.registry.schema import ModelRow, SessionImageRow


def blob_in_use(db: Session, digest: str) -> bool:
    if db.scalar(select(ModelRow.id).where(or_(ModelRow.digest == digest, ModelRow.projector_digest == digest,
                                               ModelRow.draft_digest == digest)).limit(1)) is not None:
        return True
    if digest in _adapter_digests(db):
        return True
    return db.scalar(select(SessionImageRow.id).where(SessionImageRow.digest == digest).limit(1)) is not None


def used_digests(db: Session) -> set[str]:
    used = set(db.scalars(select(ModelRow.digest).distinct()))
    used.update(db.scalars(select(ModelRow.projector_digest).where(ModelRow.projector_digest.is_not(None)).distinct()))
    used.update(db.scalars(select(ModelRow.draft_digest).where(ModelRow.draft_digest.is_not(None)).distinct()))
    used.update(db.scalars(select(SessionImageRow.digest).distinct()))
    return used | _adapter_digests(db)


def _adapter_digests(db: Session) -> set[str]:
    """The LoRA adapters' blobs (a JSON list per model, read here: few models have any)."""
    lists = db.scalars(select(ModelRow.adapters).where(ModelRow.adapters.is_not(None)))
    return {adapter["digest"] for adapters in lists for adapter in adapters or ()}
