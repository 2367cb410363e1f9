"""A model's kind for rows registered before kinds were recorded (registry/gguf_meta.py
`model_kind` writes `details["kind"]` at registration): read once from the blob's GGUF header, at
the daemon's start. Such a row was served as a chat model; an encoder or a reranker among them
would otherwise stay one."""

from __future__ import annotations

import logging
import mmap
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from myllm.registry.gguf_header import read_header
from myllm.registry.gguf_meta import model_kind
from myllm.registry.schema import models
from myllm.registry.store import Registry

log = logging.getLogger(__name__)

READ_KEYS = ("pooling_type", "attention.causal")
"""The architecture's keys the kind is told by, kept in `details` as registration keeps them
(`LoadSpec.pooling` reads `pooling_type`)."""


def kind_details(path: Path) -> dict[str, Any]:
    """What registration would have put in `details` for the kind: `kind`, and the keys it is
    told by that the file has. The header alone is walked (arrays stepped over), never the
    tensors' data. `OSError` or `HeaderError` for a file that cannot be read as GGUF."""
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        header = read_header(data)
        arch = header.value("general.architecture")
        found = {key: value for key in READ_KEYS if (value := header.value(f"{arch}.{key}")) is not None}
        found["kind"] = model_kind(found, {t.name for t in header.tensors})
    return found


def fill_in_kinds(registry: Registry) -> int:
    """Give every row without a recorded kind the kind its blob says, and the keys it is told by;
    the rows written (their `modified_at` kept). A row whose blob is missing here, or unreadable,
    is left as it is (a chat model, as before) and tried again at the next start."""
    with registry.engine.connect() as conn:
        rows = [(r.id, r.name, r.digest, dict(r.details or {}))
                for r in conn.execute(select(models.c.id, models.c.name, models.c.digest, models.c.details))
                if "kind" not in (r.details or {})]
    found: dict[str, dict[str, Any] | None] = {}
    written = 0
    for row_id, name, digest, details in rows:
        if digest not in found:
            found[digest] = _read(registry.blobs.path(digest), name)
        read = found[digest]
        if read is None:
            continue
        with registry.engine.begin() as conn:
            conn.execute(update(models).where(models.c.id == row_id)
                         .values(details={**details, **read}, modified_at=models.c.modified_at))
        log.info("model %s is a %s model (its kind read from its file, once)", name, read["kind"])
        written += 1
    return written


def _read(path: Path, name: str) -> dict[str, Any] | None:
    try:
        return kind_details(path)
    except (OSError, ValueError) as exc:  # missing here, or no GGUF header (HeaderError; an empty file)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.warning("the kind of model %s is unknown, its file cannot be read (%s): it is served as a chat model",
                    name, reason)
        return None
