"""Images of stored conversations (sessions, Responses chains): their bytes are blobs of the
store, named by sha256 as every blob is (the digest the request side's `decode_image` gives),
and the database says where in its message each one was (`schema.session_images`), so a stored
message is its text and images in the order they were sent. A later turn's prompt is then the
one the model was given (the runner's KV reuse goes on through the images), on any daemon that
shares the database and the blob store.

A turn's images are written here only once the runtime has decoded them (a bad image is a 400
before any answer: nothing stored), each whole or not at all (staged, then renamed), and
before the transaction that writes their rows, so a row never names a blob that is missing.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from myllm.errors import BadImage, ImageNotFound
from myllm.registry.blob_refs import blob_in_use
from myllm.registry.blobs import BlobStore


@dataclass(frozen=True)
class ImageRef:
    """A stored image: its blob and its bytes."""

    digest: str
    size: int


Parts = str | list[str | ImageRef]
"""A stored message's content: text, or its pieces of text and images in order."""
Content = str | list[str | bytes]
"""A message's content as the runtime takes it (runtime/request/images.py's `Content`): text, or
pieces of text and image files in order."""
Placed = tuple[tuple[int, ImageRef], ...]
"""A message's images with, for each, the length of its text before it."""

GRACE = 60.0
"""Seconds a blob written or touched for a turn is left alone when a deleted session lets go
of it: a turn storing the same image elsewhere touches it before its rows commit, so a young
blob may be named again any moment. The sweep of unused blobs (MYLLM_BLOB_TTL) takes it later."""

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def split(parts: Parts) -> tuple[str, Placed]:
    """A stored content's text and where its images go in it."""
    if isinstance(parts, str):
        return parts, ()
    text: list[str] = []
    placed: list[tuple[int, ImageRef]] = []
    at = 0
    for part in parts:
        if isinstance(part, ImageRef):
            placed.append((at, part))
        else:
            text.append(part)
            at += len(part)
    return "".join(text), tuple(placed)


def joined(text: str, placed: Placed) -> Parts:
    """The inverse of `split`: the text cut where the images go (images at one place keep their
    order; no empty text pieces)."""
    if not placed:
        return text
    out: list[str | ImageRef] = []
    pos = 0
    for at, image in placed:
        if at > pos:
            out.append(text[pos:at])
            pos = at
        out.append(image)
    if pos < len(text):
        out.append(text[pos:])
    return out


def images_of(content: Content) -> list[bytes]:
    return [] if isinstance(content, str) else [piece for piece in content if isinstance(piece, bytes)]


def text_of(content: Content) -> str:
    """A content's text alone (what a message's `tokens` count and its `content` shows)."""
    return content if isinstance(content, str) else "".join(piece for piece in content if isinstance(piece, str))


def within_images(messages: list[dict[str, Any]], room: int) -> list[dict[str, Any]]:
    """Stored messages (content as `Parts`) for a prompt that may hold `room` more images
    (MYLLM_MAX_IMAGES less the new turn's): the oldest after a first system message left out
    until the rest fit, as a conversation longer than MYLLM_MAX_MESSAGES goes on."""
    counts = [0 if isinstance(m["content"], str) else sum(isinstance(p, ImageRef) for p in m["content"]) for m in messages]
    total = sum(counts)
    head = 1 if messages and messages[0]["role"] == "system" else 0
    start = head
    while total > max(room, 0) and start < len(messages):
        total -= counts[start]
        start += 1
    return messages if start == head else messages[:head] + messages[start:]


def check_room(stored: Iterable[ImageRef], new: Iterable[bytes], limit: int) -> None:
    """A turn whose images would take a stored conversation past `limit` bytes of images, all its
    messages together (MYLLM_MAX_SESSION_IMAGE_BYTES), is refused before it runs (400)."""
    held = sum(image.size for image in stored)
    total = held + sum(len(data) for data in new)
    if total > limit:
        raise BadImage(f"this conversation would hold {total} bytes of images ({held} stored); a stored conversation "
                       f"may hold at most {limit} (MYLLM_MAX_SESSION_IMAGE_BYTES): start a new one",
                       "too_many_bytes")


def media_type(head: bytes) -> str:
    """An image file's type, read from its first bytes (one of the formats `decode_image` takes)."""
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


class SessionImages:
    """The blob side of stored images: writing a turn's, reading them back into a prompt or an
    answer, and letting go of a deleted conversation's. Blocking: callers run it on the blob pool."""

    def __init__(self, blobs: BlobStore, engine: Engine) -> None:
        self.blobs = blobs
        self._engine = engine

    def keep(self, contents: list[Content]) -> list[Parts]:
        """Write the images among `contents` into the store (each blob once, however many
        messages send it) and give the contents back with each image as its `ImageRef`, as a
        stored message holds them. A blob already there is touched (young again: see `GRACE`)."""
        kept: list[Parts] = []
        for content in contents:
            if isinstance(content, str):
                kept.append(content)
                continue
            kept.append([self._put(piece) if isinstance(piece, bytes) else piece for piece in content])
        return kept

    def _put(self, data: bytes) -> ImageRef:
        digest = hashlib.sha256(data).hexdigest()
        try:
            self.blobs.touch(digest)
        except FileNotFoundError:
            self.blobs.commit(self.blobs.stage_stream(io.BytesIO(data)), digest)
        return ImageRef(digest, len(data))

    def read(self, digest: str) -> bytes:
        try:
            return self.blobs.path(digest).read_bytes()
        except FileNotFoundError:
            raise ImageNotFound(f"image sha256:{digest} of this conversation is not in this daemon's blob store "
                                "(a replica needs the blob store the other daemons write to)") from None

    def inline(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Stored messages (`content` as `Parts`) as the runtime takes them: each image's bytes
        read from the store in its place."""
        out = []
        for message in messages:
            content = message["content"]
            if not isinstance(content, str):
                message = {**message, "content": [self.read(p.digest) if isinstance(p, ImageRef) else p for p in content]}
            out.append(message)
        return out

    def let_go(self, digests: Iterable[str]) -> list[str]:
        """Remove the blobs of a deleted conversation's images that nothing uses any more (no
        model, no other message), unless written or touched within `GRACE`; returns those removed."""
        cutoff = time.time() - GRACE
        removed = []
        for digest in set(digests):
            with self._engine.connect() as conn:
                if blob_in_use(conn, digest):
                    continue
            try:
                if self.blobs.path(digest).stat().st_mtime >= cutoff:
                    continue
            except FileNotFoundError:
                continue
            self.blobs.remove(digest)
            removed.append(digest)
        return removed
