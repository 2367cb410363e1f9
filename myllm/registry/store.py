"""The model registry: names in the database, bytes in the blob store, kept consistent."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import TemplateSyntaxError
from sqlalchemy import ColumnElement, delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from myllm.errors import (
    BlobNotFound,
    InvalidModelFile,
    InvalidModelName,
    InvalidOptions,
    ModelBroken,
    ModelExists,
    ModelFileMissing,
    ModelNotFound,
)
from myllm.pools import Pools
from myllm.registry.blob_refs import blob_in_use, used_digests
from myllm.registry.blobs import BlobStore, Staged, sha256_file
from myllm.registry.chat_templates import check_template
from myllm.registry.db import make_engine
from myllm.registry.gguf_check import check_gguf
from myllm.registry.gguf_meta import GGUFInfo, read_gguf_info
from myllm.registry.names import normalize
from myllm.registry.projector_check import check_pairing, check_projector
from myllm.registry.row_cache import RowCache
from myllm.registry.schema import ModelRow, models, utcnow
from myllm.registry.session_images import SessionImages
from myllm.settings import Settings


@dataclass(frozen=True)
class Overrides:
    """A model's own defaults, as a Modelfile's PARAMETER, SYSTEM, TEMPLATE, MESSAGE and
    LICENSE lines give them, laid over what the model inherits (its base model's, or its
    file's own): parameters merge key by key, the rest replace when not None. They travel
    into the transaction that writes the model's row, so no name is ever seen without them."""

    parameters: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    template_override: str | None = None
    messages: list[dict[str, str]] | None = None
    license: str | None = None
    adapters: list[dict[str, Any]] | None = None
    """LoRA adapter blobs already in the store ([{"digest", "size"}]): they replace the base's."""
    draft: dict[str, Any] | None = None
    """The draft model's columns (registry/drafts.py `draft_columns`), checked before."""

    def lay_over(self, row: ModelRow) -> None:
        row.parameters = {**row.parameters, **self.parameters}
        for column in ("system", "template_override", "messages", "license", "adapters"):
            value = getattr(self, column)
            if value is not None:
                setattr(row, column, value)
        for column, value in (self.draft or {}).items():
            setattr(row, column, value)


@dataclass(frozen=True)
class Projector:
    """A projector blob in the store, to register beside a model (`register`, `register_blob`,
    `copy`), and the file as the user knows it, for errors."""

    digest: str
    shown_as: str


class Registry:
    def __init__(self, engine: Engine, blobs: BlobStore, pools: Pools | None = None) -> None:
        self.engine = engine
        """Reads take a connection of it, writes a transaction (`engine.begin()`)."""
        self.blobs = blobs
        self.pools = pools or Pools.from_settings(Settings())
        """Where async callers run this registry's blocking calls (myllm/pools.py): database
        calls on `pools.db`, blob I/O on `pools.blobs`; the methods themselves are blocking."""
        self.rows = RowCache(engine)
        self.images = SessionImages(blobs, engine)
        """The blobs of stored conversations' images (registry/session_images.py)."""

    @classmethod
    def open(cls, settings: Settings) -> Registry:
        """Open (and migrate) the database and sweep temp files a crash left behind. A server
        database keeps a connection for every pool thread that may call it."""
        pools = Pools.from_settings(settings)
        registry = cls(make_engine(settings.db_url, pools.connections), BlobStore(settings.blobs_dir), pools)
        registry.blobs.sweep_temp()
        return registry

    def close(self) -> None:
        self.rows.close()
        self.pools.close()
        self.engine.dispose()

    # -- reading -----------------------------------------------------------------

    def get(self, name: str) -> ModelRow:
        key = normalize(name)
        with self.engine.connect() as conn:
            row = _named(conn, key)
        if row is None:
            raise ModelNotFound(name)
        return row

    async def lookup(self, name: str) -> ModelRow:
        """`get` for async callers (every request resolves its model by it): from the row
        cache while the database has not changed since (row_cache.py), else on the pool."""
        key = normalize(name)
        row, version = self.rows.get(key)
        if row is None:
            row = await self.pools.db.run(self.get, name)
            self.rows.put(key, row, version)
        return row

    def find(self, name: str) -> ModelRow | None:
        """Like `get`, but None for a name that is not registered (or could not be)."""
        try:
            return self.get(name)
        except (ModelNotFound, InvalidModelName):
            return None

    def list(self) -> list[ModelRow]:
        with self.engine.connect() as conn:
            return [ModelRow.of(r) for r in conn.execute(select(models).order_by(models.c.name))]

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(models)) or 0)

    def problem(self, row: ModelRow) -> str | None:
        """What is wrong with a model's blob or its projector's (missing, wrong size, digest
        mismatch), or None. The sha256 is recomputed only when the file's size or mtime changed
        since the last check, so this is cheap after the first call."""
        problem = self._blob_problem(row.digest, row.size)
        if problem is None and row.projector_digest is not None:
            problem = self._blob_problem(row.projector_digest, row.projector_size or 0)
        if problem is None and row.draft_digest is not None:
            problem = self._blob_problem(row.draft_digest, row.draft_size or 0)
        return problem

    def _blob_problem(self, digest: str, size: int) -> str | None:
        path = self.blobs.path(digest)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return f"blob {path.name} is missing"
        if stat.st_size != size:
            return f"blob {path.name} is {stat.st_size} bytes, expected {size}"
        ok = self.blobs.checked(digest, stat.st_size, stat.st_mtime_ns)
        if ok is None:
            ok = sha256_file(path) == digest
            self.blobs.record_check(digest, ok)
        return None if ok else f"blob {path.name} no longer matches its sha256 digest"

    def blob_file(self, row: ModelRow) -> Path:
        """The model's file on this machine, checked as `problem` checks it: `ModelFileMissing`
        (404, naming what to pull) when this machine has none, `ModelBroken` when it is damaged."""
        problem = self.problem(row)
        if problem is None:
            return self.blobs.path(row.digest)
        for digest in (row.digest, row.projector_digest, row.draft_digest):
            if digest is not None and not self.blobs.exists(digest):
                raise ModelFileMissing(row.name, digest, row.shown_source)
        raise ModelBroken(f"model '{row.name}' is broken: {problem}; pull it again")

    def projector_file(self, row: ModelRow) -> Path | None:
        """The model's projector on this machine (checked with the model by `blob_file`), or None."""
        return None if row.projector_digest is None else self.blobs.path(row.projector_digest)

    def draft_file(self, row: ModelRow) -> Path | None:
        """The model's draft model on this machine (checked with the model by `blob_file`), or None."""
        return None if row.draft_digest is None else self.blobs.path(row.draft_digest)

    def _info(self, digest: str, path: Path, source: str) -> dict[str, Any]:
        """The metadata columns of the blob `digest` (whose bytes are at `path`), once
        `check_gguf` has passed them (`InvalidModelFile` naming `source` otherwise): copied
        from a row that has them, so a second name skips re-reading the file, else read
        from it. The check runs either way, as that row may predate it."""
        with self.engine.connect() as conn:
            row = _first(conn, models.c.digest == digest)
        if row is None:
            info = _info_columns(read_gguf_info(path, source))
        else:
            check_gguf(path, source)
            info = _row_info(row)
        _check_file_template(info.get("chat_template"), source)
        return info

    # -- writing -----------------------------------------------------------------

    def register(
        self,
        name: str,
        staged: Staged,
        source: str,
        expected_digest: str | None = None,
        on_verify: Callable[[], None] | None = None,
        overrides: Overrides | None = None,
        projector: Projector | None = None,
    ) -> ModelRow:
        """Check staged bytes as a GGUF model (`check_gguf`, errors naming `source`), commit
        the blob and write the row in one transaction.

        Without `overrides` (a pull) an existing row of that name must hold the same file: its
        metadata is refreshed and it keeps its own defaults; another file is `ModelExists` (409),
        since a pull must never re-point a name someone made, Modelfile settings and all, to other
        weights. With `overrides`, as `myllm create` from a file, it is replaced whole and the
        new row is written with `overrides` laid over the file's own values, in that transaction.
        `projector` (from `stored_projector`) is the model's projector, checked against it here.
        On any failure nothing is left behind: the temp file is removed and a blob this call
        added is removed again.
        """
        key = normalize(name)
        blob_was_there = self.blobs.exists(staged.digest)
        try:
            if on_verify:
                on_verify()
            info = self._info(staged.digest, staged.path, source)
            info.update(self._projector_columns(projector, info["embedding_length"], source))
            digest = self.blobs.commit(staged, expected_digest)
        except BaseException:
            self.blobs.discard(staged)
            raise
        try:
            row, replaced = self._upsert(key, digest, staged.size, source, info, overrides)
        except BaseException:
            if not blob_was_there:
                self._drop_unused_blob(digest)
            raise
        self._let_go(replaced, row)
        return row

    def register_blob(self, name: str, digest: str, source: str, overrides: Overrides | None = None,
                      projector: Projector | None = None) -> ModelRow:
        """Register a blob already in the store (uploaded whole and checked against its digest
        beforehand, as Ollama's `POST /api/blobs` does) under `name`, as `register` does with
        staged bytes, with `projector` (another uploaded blob) beside it. A blob that is no
        usable GGUF (or projector) is removed unless a model uses it: no model ever could.
        Otherwise the blobs stay whatever happens."""
        key = normalize(name)
        for blob in (digest, *([projector.digest] if projector else [])):
            if not self.blobs.path(blob).is_file():
                raise BlobNotFound(f"blob sha256:{blob} is not in the blob store")
            self.blobs.touch(blob)  # young again: the sweep of unused blobs leaves it while it is registered
        path = self.blobs.path(digest)
        try:
            info = self._info(digest, path, source)
        except InvalidModelFile:
            self._drop_unused_blob(digest)
            raise
        if projector is not None:
            try:
                check_projector(self.blobs.path(projector.digest), projector.shown_as)
            except InvalidModelFile:
                self._drop_unused_blob(projector.digest)
                raise
        info.update(self._projector_columns(projector, info["embedding_length"], source))
        row, replaced = self._upsert(key, digest, path.stat().st_size, source, info, overrides)
        self._let_go(replaced, row)
        return row

    @contextmanager
    def stored_projector(self, staged: Staged, source: str, expected_digest: str | None = None) -> Iterator[Projector]:
        """Check staged bytes as a projector (`check_projector`, errors naming `source`) and
        commit them, for the model registered within the block (`projector=`). If the block
        fails, the blob is removed again unless it was stored before or a model uses it."""
        was_there = self.blobs.exists(staged.digest)
        try:
            check_projector(staged.path, source)
            digest = self.blobs.commit(staged, expected_digest)
        except BaseException:
            self.blobs.discard(staged)
            raise
        try:
            yield Projector(digest, source)
        except BaseException:
            if not was_there:
                self._drop_unused_blob(digest)
            raise

    def _projector_columns(self, projector: Projector | None, text_width: int | None, model: str) -> dict[str, Any]:
        """The row's projector columns, once the projector is found made for a text model of
        `text_width` (`check_pairing`)."""
        if projector is None:
            return {"projector_digest": None, "projector_size": None}
        path = self.blobs.path(projector.digest)
        check_pairing(check_projector(path, projector.shown_as), text_width, projector.shown_as, model)
        return {"projector_digest": projector.digest, "projector_size": path.stat().st_size}

    def _upsert(
        self, key: str, digest: str, size: int, source: str, info: dict[str, Any], overrides: Overrides | None
    ) -> tuple[ModelRow, set[str]]:
        with self.engine.begin() as conn:
            row = _named(conn, key)
            replaced = _blobs_of(row)
            if row is not None and overrides is None and row.digest != digest:
                raise ModelExists(
                    f"model '{key}' already exists with another file (sha256 {row.digest[:12]}); remove it first "
                    "or pull under another name"
                )
            if row is not None and overrides is not None:
                _delete(conn, row)
                row = None
            if row is None:
                row = ModelRow(name=key, parameters={})
            row.digest = digest
            row.size = size
            row.source = source
            for column, value in info.items():
                setattr(row, column, value)
            if overrides is not None:
                overrides.lay_over(row)
            row.modified_at = utcnow()
            _write(conn, row)
        self.blobs.record_check(digest, True)  # just hashed on the way in
        return row, replaced

    def copy(self, src: str, dst: str, overrides: Overrides | None = None, *, replace: bool = False,
             projector: Projector | None = None) -> ModelRow:
        """A second name for the same blob (and projector), with the same defaults and `overrides`
        laid over them, written in one transaction; `projector` replaces the source's. An
        existing `dst` is `ModelExists`, unless `replace`: then it is deleted in that same
        transaction, so a failure before the commit leaves it intact. `src` may be `dst` itself,
        to change a model's defaults."""
        key = normalize(dst)
        try:
            with self.engine.begin() as conn:
                original = _named(conn, normalize(src))
                if original is None:
                    raise ModelNotFound(src)
                columns = original.values()
                if projector is not None:
                    columns.update(self._projector_columns(projector, original.embedding_length, original.name))
                existing = _named(conn, key) if replace else None
                if existing is not None:
                    _delete(conn, existing)
                row = ModelRow(**{**columns, "name": key, "created_at": utcnow(), "modified_at": utcnow()})
                if overrides is not None:
                    overrides.lay_over(row)
                _write(conn, row)
        except DBIntegrityError as exc:
            raise ModelExists(f"model '{key}' already exists") from exc
        self._let_go(_blobs_of(existing), row)
        return row

    def remove(self, name: str) -> ModelRow:
        """Delete a name; its blob and its projector's each go only when no other name uses it."""
        key = normalize(name)
        with self.engine.begin() as conn:
            row = _named(conn, key)
            if row is None:
                raise ModelNotFound(name)
            _delete(conn, row)
        for digest in _blobs_of(row):
            self._drop_unused_blob(digest)
        return row

    def unused_blobs(self) -> dict[str, os.stat_result]:
        """The blobs in this machine's store that no model uses nor any stored conversation
        (uploads not yet created, what a crash between a commit and its row left, the images of
        deleted sessions), with their stat."""
        stored = self.blobs.digests()
        if not stored:
            return {}
        with self.engine.connect() as conn:
            used = used_digests(conn)
        found = {}
        for digest in stored - used:
            try:
                found[digest] = self.blobs.path(digest).stat()
            except FileNotFoundError:
                continue
        return found

    def sweep_unused_blobs(self, max_age: float) -> list[str]:
        """Remove the blobs no model uses nor any stored conversation that were stored (or last
        registered from, or sent in a turn) more than `max_age` seconds ago; a blob in use is never
        removed (each is checked once more just before, as a create may have named it meanwhile)."""
        cutoff = time.time() - max_age
        swept = []
        for digest, stat in self.unused_blobs().items():
            if stat.st_mtime < cutoff and not self._blob_in_use(digest) and not self._young(digest, cutoff):
                self.blobs.remove(digest)
                swept.append(digest)
        return swept

    def _young(self, digest: str, cutoff: float) -> bool:
        """Whether the blob was touched (`BlobStore.touch`: a create started on it) since `cutoff`."""
        try:
            return self.blobs.path(digest).stat().st_mtime >= cutoff
        except FileNotFoundError:
            return True  # gone already: nothing to remove

    def _let_go(self, replaced: set[str], row: ModelRow) -> None:
        """Remove the blobs a replaced row used that its replacement does not, unless another uses them."""
        for digest in replaced - _blobs_of(row):
            self._drop_unused_blob(digest)

    def _drop_unused_blob(self, digest: str) -> None:
        """Remove a blob once no name points at it. Called only after the commit that let go of
        it, so a write that dies before its commit never takes the bytes of a model that stays."""
        if not self._blob_in_use(digest):
            self.blobs.remove(digest)

    def _blob_in_use(self, digest: str) -> bool:
        with self.engine.connect() as conn:
            return blob_in_use(conn, digest)


def _named(conn: Connection, key: str) -> ModelRow | None:
    return _first(conn, models.c.name == key)


def _first(conn: Connection, where: ColumnElement[bool]) -> ModelRow | None:
    found = conn.execute(select(models).where(where).limit(1)).first()
    return ModelRow.of(found) if found is not None else None


def _blobs_of(row: ModelRow | None) -> set[str]:
    """The blobs a row uses: its model's, its projector's, its draft model's and its adapters'."""
    if row is None:
        return set()
    own = {d for d in (row.digest, row.projector_digest, row.draft_digest) if d is not None}
    return own | {a["digest"] for a in row.adapters or ()}


def _delete(conn: Connection, row: ModelRow) -> None:
    """Delete `row` within the caller's transaction (a new row of the same name may follow it there)."""
    conn.execute(delete(models).where(models.c.id == row.id))


def _write(conn: Connection, row: ModelRow) -> None:
    """Write `row` within the caller's transaction: a new one (no `id` yet) is inserted and given
    its `id`, an existing one has every column updated."""
    if row.id is None:
        row.id = conn.execute(insert(models).values(**row.values())).inserted_primary_key[0]
    else:
        conn.execute(update(models).where(models.c.id == row.id).values(**row.values()))


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


def _check_file_template(template: str | None, source: str) -> None:
    """A GGUF's own chat template runs at every chat: one that does not compile, or explodes on a
    one-message conversation, refuses the file here (400) instead of failing its users later."""
    if not template:
        return
    try:
        check_template(template)
    except TemplateSyntaxError as exc:
        raise InvalidModelFile(f"{source}: its chat template is not valid Jinja2 ({exc.message})") from None
    except InvalidOptions as exc:
        raise InvalidModelFile(f"{source}: {exc.message}") from None


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
