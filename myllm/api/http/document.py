"""What one API document adds to a listener, so the app mounts each document with one line and
the shared plumbing learns its paths from the documents instead of knowing any API itself."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fastapi import APIRouter

from myllm.api.http.errors import Renderer


@dataclass(frozen=True)
class ApiDocument:
    routers: tuple[APIRouter, ...]
    errors: Mapping[str, Renderer] = field(default_factory=dict)
    """Path prefix -> the renderer of this document's error shape ("/" for a listener's default;
    the longest matching prefix wins)."""
    open_paths: frozenset[str] = frozenset()
    """Served without a key (a status page, the chat page's files)."""
    generation_paths: frozenset[str] = frozenset()
    """Routes that occupy a model while they run: `MYLLM_MAX_CONCURRENT_PER_KEY` counts them."""
    streamed_body_prefixes: tuple[str, ...] = ()
    """Routes that write their body to disk as it comes (blob uploads): no body-size limit."""


def joined(documents: Iterable[ApiDocument]) -> ApiDocument:
    """One listener's documents as one: every router, error shape and path set together."""
    docs = list(documents)
    return ApiDocument(
        routers=tuple(r for d in docs for r in d.routers),
        errors={prefix: renderer for d in docs for prefix, renderer in d.errors.items()},
        open_paths=frozenset().union(*(d.open_paths for d in docs)),
        generation_paths=frozenset().union(*(d.generation_paths for d in docs)),
        streamed_body_prefixes=tuple(p for d in docs for p in d.streamed_body_prefixes),
    )
