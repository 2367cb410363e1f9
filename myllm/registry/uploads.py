"""Blob uploads (Ollama's `POST /api/blobs/sha256:...`): received on the event loop, written and
hashed on the blob pool, bounded in number, bytes and idleness, and swept when no model uses them.

An upload used to be a thread blocked on the socket for as long as the client cared to stall, on
the thread pool every route shared: six stalled uploads froze the registry. Here an upload holds
no thread while it waits: chunks are read on the loop and each few MiB are written on the blob
pool. It holds one of `MYLLM_MAX_UPLOADS` slots (past them, 429), is dropped after
`MYLLM_UPLOAD_IDLE_TIMEOUT` seconds without a byte (408), past `MYLLM_MAX_UPLOAD_SIZE` bytes (413),
or when the bytes no model uses, received or stored, would pass `MYLLM_MAX_STAGED_UPLOADS` (507);
a dropped upload's staged bytes are removed. A stored blob that no model uses after
`MYLLM_BLOB_TTL` seconds is removed (`sweep_forever`); a blob a model uses never is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from myllm.errors import MyLLMError, StagingFull, TooManyUploads, UploadStalled, UploadTooLarge
from myllm.registry.blobs import CHUNK, StagingFile
from myllm.registry.store import Registry
from myllm.settings import Settings

log = logging.getLogger(__name__)
SWEEP_EVERY = 300.0
"""Longest pause between two sweeps of unused blobs (shorter when the TTL is)."""


class Uploads:
    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.slots = settings.max_uploads
        self.idle_timeout = settings.upload_idle_timeout
        self.max_size = int(settings.max_upload_size)
        self.max_staged = int(settings.max_staged_uploads)
        self.ttl = settings.blob_ttl
        self.active = 0
        """Uploads being received now."""
        self.receiving = 0
        """Bytes the uploads in progress have received."""

    async def receive(self, digest: str, body: AsyncIterator[bytes], length: int | None = None) -> bool:
        """Store `body` as the blob `digest` (hex, already checked) if it hashes to it, else
        `IntegrityError` and nothing kept. True when it was stored now, False when the store had
        it (the body is read whole either way: the client sends it). A `length` the client
        announced is checked against the size bound before anything is read."""
        if length is not None and length > self.max_size:
            raise self._too_large()
        if self.active >= self.slots:
            raise TooManyUploads(f"{self.active} uploads are in progress (MYLLM_MAX_UPLOADS); try again shortly")
        self.active += 1
        try:
            pool, blobs = self.registry.pools.blobs, self.registry.blobs
            if await pool.run(blobs.exists, digest):
                async for _ in self._chunks(body):
                    pass
                return False
            unused = sum(stat.st_size for stat in (await pool.run(self.registry.unused_blobs)).values())
            if length is not None and unused + self.receiving + length > self.max_staged:
                raise self._full()
            staging = await pool.run(blobs.open_staging)
            try:
                await self._write(body, staging, unused)
                staged = await pool.run(staging.finish)
                await pool.run(blobs.commit, staged, digest)
            except asyncio.CancelledError:
                pool.submit(staging.discard)  # queued past the line's bound: this task is going
                raise
            except BaseException:
                await self._discard(staging)  # gone before the client hears why
                raise
            return True
        finally:
            self.active -= 1

    async def _discard(self, staging: StagingFile) -> None:
        pool = self.registry.pools.blobs
        try:
            await pool.run(staging.discard)
        except MyLLMError:  # the blob pool's line is full: queued past it instead
            pool.submit(staging.discard)

    async def _write(self, body: AsyncIterator[bytes], staging: StagingFile, unused: int) -> None:
        """The body into `staging`, a few MiB per call on the blob pool (while one is written,
        the next chunks wait in the socket: the client is slowed down, not buffered)."""
        pending: list[bytes] = []
        buffered = received = 0
        try:
            async for chunk in self._chunks(body):
                received += len(chunk)
                self.receiving += len(chunk)
                if unused + self.receiving > self.max_staged:
                    raise self._full()
                pending.append(chunk)
                buffered += len(chunk)
                if buffered >= CHUNK:
                    await self.registry.pools.blobs.run(staging.write, b"".join(pending))
                    pending, buffered = [], 0
            if pending:
                await self.registry.pools.blobs.run(staging.write, b"".join(pending))
        finally:
            self.receiving -= received

    async def _chunks(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The body's chunks, each within the idle timeout, at most `max_size` bytes in all."""
        size = 0
        while True:
            try:
                chunk = await asyncio.wait_for(anext(body, None), self.idle_timeout)
            except TimeoutError:
                raise UploadStalled(f"the upload sent nothing for {self.idle_timeout:g} s "
                                    "(MYLLM_UPLOAD_IDLE_TIMEOUT)") from None
            if chunk is None:
                return
            size += len(chunk)
            if size > self.max_size:
                raise self._too_large()
            yield chunk

    def _too_large(self) -> UploadTooLarge:
        return UploadTooLarge(f"the upload is larger than {self.max_size} bytes (MYLLM_MAX_UPLOAD_SIZE)")

    def _full(self) -> StagingFull:
        return StagingFull(f"uploads no model uses would pass {self.max_staged} bytes (MYLLM_MAX_STAGED_UPLOADS); "
                           "create models from the uploaded blobs first")

    async def sweep_forever(self) -> None:
        """Remove blobs no model uses once they are `ttl` seconds old, checking every half TTL
        (at most `SWEEP_EVERY`), on the blob pool."""
        while True:
            await asyncio.sleep(min(self.ttl / 2, SWEEP_EVERY))
            try:
                swept = await self.registry.pools.blobs.run(self.registry.sweep_unused_blobs, self.ttl)
            except Exception as exc:  # noqa: BLE001 (a failed sweep is tried again at the next)
                log.warning("sweeping unused blobs failed: %s", exc)
                continue
            for digest in swept:
                log.info("removed blob sha256:%s: no model used it for %g s (MYLLM_BLOB_TTL)", digest[:12], self.ttl)
