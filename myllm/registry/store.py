"""The model registry: names in the database, bytes in the blob store, kept consistent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session, sessionmaker

from myllm.errors import InvalidModelName, ModelExists, ModelNotFound
from myllm.registry.blobs import BlobStore, Staged, sha256_file
from myllm.registry.db import make_engine, make_sessionmaker
from myllm.registry.gguf_meta import GGUFInfo, read_gguf_info
from myllm.registry.names import normalize
from myllm.registry.schema import BlobCheckRow, ModelRow, utcnow
from myllm.settings import Settings


class Registry:
    def __init__(self, engine: Engine, blobs: BlobStore) -> None:
        self.engine = engine
        self.sessions: sessionmaker[Session] = make_sessionmaker(engine)
        self.blobs = blobs

    @classmethod
    def open(cls, settings: Settings) -> Registry:
        """Open (and migrate) the database and sweep temp files a crash left behind."""
        registry = cls(make_engine(settings.db_url), BlobStore(settings.blobs_dir))
        registry.blobs.sweep_temp()
        return registry

    def close(self) -> None:
        self.engine.dispose()

    # -- reading -----------------------------------------------------------------

    def get(self, name: str) -> ModelRow:
        key = normalize(name)
        with self.sessions() as db:
            row = db.scalar(select(ModelRow).where(ModelRow.name == key))
        if row is None:
            raise ModelNotFound(name)
        return row

    def find(self, name: str) -> ModelRow | None:
        """Like `get`, but None for a name that is not registered (or could not be)."""
        try:
            return self.get(name)
        except (ModelNotFound, InvalidModelName):
            return None

    def list(self) -> list[ModelRow]:
        with self.sessions() as db:
            return list(db.scalars(select(ModelRow).order_by(ModelRow.name)))

    def count(self) -> int:
        with self.sessions() as db:
            return int(db.scalar(select(func.count()).select_from(ModelRow)) or 0)

    def problem(self, row: ModelRow) -> str | None:
        """What is wrong with a model's blob (missing, wrong size, digest mismatch), or None.
        The sha256 is recomputed only when the file's size or mtime changed since the last
        check, so this is cheap after the first call."""
        path = self.blobs.path(row.digest)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return f"blob {path.name} is missing"
        if stat.st_size != row.size:
            return f"blob {path.name} is {stat.st_size} bytes, expected {row.size}"
        with self.sessions() as db:
            check = db.get(BlobCheckRow, row.digest)
        if check is None or (check.size, check.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            ok = sha256_file(path) == row.digest
            with self.sessions.begin() as db:
                db.merge(BlobCheckRow(digest=row.digest, size=stat.st_size, mtime_ns=stat.st_mtime_ns, ok=ok,
                                      checked_at=utcnow()))
        else:
            ok = check.ok
        return None if ok else f"blob {path.name} no longer matches its sha256 digest"

    def _info_for_digest(self, digest: str) -> dict[str, Any] | None:
        """Metadata of a blob we already know, so a second name skips re-reading the file."""
        with self.sessions() as db:
            row = db.scalar(select(ModelRow).where(ModelRow.digest == digest).limit(1))
        return None if row is None else _row_info(row)

    # -- writing -----------------------------------------------------------------

    def register(
        self,
        name: str,
        staged: Staged,
        source: str,
        expected_digest: str | None = None,
        on_verify: Callable[[], None] | None = None,
    ) -> ModelRow:
        """Validate staged bytes as GGUF, commit the blob and write the row in one transaction.

        On any failure nothing is left behind: the temp file is removed and a blob this call
        added is removed again.
        """
        key = normalize(name)
        blob_was_there = self.blobs.exists(staged.digest)
        try:
            if on_verify:
                on_verify()
            info = self._info_for_digest(staged.digest)
            if info is None:
                info = _info_columns(read_gguf_info(staged.path))
            digest = self.blobs.commit(staged, expected_digest)
        except BaseException:
            self.blobs.discard(staged)
            raise
        try:
            row, replaced = self._upsert(key, digest, staged.size, source, info)
        except BaseException:
            if not blob_was_there and not self._blob_in_use(digest):
                self.blobs.remove(digest)
            raise
        if replaced and replaced != digest and not self._blob_in_use(replaced):
            self.blobs.remove(replaced)
        return row

    def _upsert(
        self, key: str, digest: str, size: int, source: str, info: dict[str, Any]
    ) -> tuple[ModelRow, str | None]:
        with self.sessions.begin() as db:
            row = db.scalar(select(ModelRow).where(ModelRow.name == key))
            replaced = row.digest if row is not None else None
            if row is None:
                row = ModelRow(name=key, parameters={})
                db.add(row)
            row.digest = digest
            row.blob_path = str(self.blobs.path(digest))
            row.size = size
            row.source = source
            for column, value in info.items():
                setattr(row, column, value)
            row.modified_at = utcnow()
            stat = self.blobs.path(digest).stat()  # just hashed on the way in: record it as checked
            db.merge(BlobCheckRow(digest=digest, size=stat.st_size, mtime_ns=stat.st_mtime_ns, ok=True, checked_at=utcnow()))
        return row, replaced

    def copy(self, src: str, dst: str) -> ModelRow:
        """A second name for the same blob, with the same overrides."""
        original = self.get(src)
        key = normalize(dst)
        columns = {c.key: getattr(original, c.key) for c in ModelRow.__table__.columns}
        columns.pop("id")
        columns.update(name=key, created_at=utcnow(), modified_at=utcnow())
        try:
            with self.sessions.begin() as db:
                row = ModelRow(**columns)
                db.add(row)
        except DBIntegrityError as exc:
            raise ModelExists(f"model '{key}' already exists") from exc
        return row

    def set_overrides(self, name: str, **overrides: Any) -> ModelRow:
        """Store a model's own defaults (parameters, system, template_override, messages,
        license), as `myllm create` derives them from a Modelfile."""
        allowed = {"parameters", "system", "template_override", "messages", "license"}
        unknown = set(overrides) - allowed
        if unknown:
            raise ValueError(f"not an override: {', '.join(sorted(unknown))}")
        key = normalize(name)
        with self.sessions.begin() as db:
            row = db.scalar(select(ModelRow).where(ModelRow.name == key))
            if row is None:
                raise ModelNotFound(name)
            for column, value in overrides.items():
                setattr(row, column, value)
            row.modified_at = utcnow()
        return row

    def remove(self, name: str) -> ModelRow:
        """Delete a name; its blob goes only when no other name uses it."""
        key = normalize(name)
        with self.sessions.begin() as db:
            row = db.scalar(select(ModelRow).where(ModelRow.name == key))
            if row is None:
                raise ModelNotFound(name)
            db.delete(row)
        if not self._blob_in_use(row.digest):
            self.blobs.remove(row.digest)
        return row

    def _blob_in_use(self, digest: str) -> bool:
        with self.sessions() as db:
            return db.scalar(select(ModelRow.id).where(ModelRow.digest == digest).limit(1)) is not None


_INFO_COLUMNS = (
    "architecture",
    "family",
    "parameter_count",
    "parameter_size",
    "quantization",
    "context_length",
    "embedding_length",
    "vocab_size",
    "chat_template",
    "license",
    "details",
)


def _info_columns(info: GGUFInfo) -> dict[str, Any]:
    details = dict(info.details)
    details.update(general_name=info.name, bos_token=info.bos_token, eos_token=info.eos_token)
    return {
        "architecture": info.architecture,
        "family": info.architecture,
        "parameter_count": info.parameter_count,
        "parameter_size": info.size_label,
        "quantization": info.quantization,
        "context_length": info.context_length,
        "embedding_length": info.embedding_length,
        "vocab_size": info.vocab_size,
        "chat_template": info.chat_template,
        "license": info.license,
        "details": details,
    }


def _row_info(row: ModelRow) -> dict[str, Any]:
    return {column: getattr(row, column) for column in _INFO_COLUMNS}
