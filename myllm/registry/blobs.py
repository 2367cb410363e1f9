"""Content-addressed blob store: `blobs/sha256-<hex>`, written whole or not at all.

Bytes are first *staged* in a temp file inside the store folder (hashed on the way in),
checked by the caller, then *committed* with an atomic rename.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from myllm.errors import IntegrityError, InvalidDigest

ProgressFn = Callable[[int, int | None], None]
"""Called with (bytes done, bytes total or None) while bytes move."""

CHUNK = 4 * 1024 * 1024
TEMP_PREFIX = ".partial-"
_BLOB_RE = re.compile(r"^sha256-[0-9a-f]{64}$")
_HEX_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Staged:
    path: Path
    digest: str
    size: int


def sha256_file(path: Path, progress: ProgressFn | None = None) -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
            done += len(block)
            if progress:
                progress(done, total)
    return digest.hexdigest()


def parse_digest(text: str) -> str:
    """The hex of a digest as clients name a blob (`sha256:` and 64 lower-case hex digits).
    Checked strictly, before it is part of any path: a client's digest used as a file name
    is how path traversal gets in, so anything else (`..`, `/`, upper case, another length or
    algorithm) is `InvalidDigest`."""
    algorithm, _, hexdigest = text.partition(":")
    if algorithm != "sha256" or not _HEX_RE.fullmatch(hexdigest):
        raise InvalidDigest(f"invalid digest {text[:100]!r}: expected 'sha256:' and 64 lower-case hex digits")
    return hexdigest


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.checks = root.with_name(f"{root.name}-checks")
        """Beside the store: each blob's last sha256 check (see `checked`)."""

    def path(self, digest: str) -> Path:
        """Where the blob of `digest` (64 lower-case hex digits, checked here too) lives."""
        if not _HEX_RE.fullmatch(digest):
            raise InvalidDigest(f"invalid digest {digest[:100]!r}: expected 64 lower-case hex digits")
        return self.root / f"sha256-{digest}"

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def checked(self, digest: str, size: int, mtime_ns: int) -> bool | None:
        """The verdict of this store's last sha256 check of a blob (True: it matched its digest),
        or None when there was none since the file last changed (its size or mtime differ). Kept
        beside the store, not in the database: a database shared by several machines would hold
        one machine's check for every machine's different file."""
        try:
            fields = self._check_record(digest).read_text().split()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if len(fields) != 3 or fields[:2] != [str(size), str(mtime_ns)]:
            return None
        return fields[2] == "ok"

    def record_check(self, digest: str, ok: bool) -> None:
        """Remember a sha256 check of the blob as it is now (written whole or not at all)."""
        stat = self.path(digest).stat()
        self.checks.mkdir(exist_ok=True)
        tmp = self.checks / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        tmp.write_text(f"{stat.st_size} {stat.st_mtime_ns} {'ok' if ok else 'bad'}\n")
        os.replace(tmp, self._check_record(digest))

    def _check_record(self, digest: str) -> Path:
        return self.checks / self.path(digest).name

    def temp_path(self) -> Path:
        """A temp name in the blob folder itself, so the final rename is atomic. It carries the
        writer's pid, so a sweep in another process (every CLI command and daemon start opens
        the registry) leaves a pull that is still running alone."""
        return self.root / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"

    def stage_stream(
        self, src: BinaryIO, total: int | None = None, progress: ProgressFn | None = None
    ) -> Staged:
        staging = self.open_staging()
        try:
            while block := src.read(CHUNK):
                staging.write(block)
                if progress:
                    progress(staging.size, total)
            return staging.finish()
        except BaseException:
            staging.discard()
            raise

    def open_staging(self) -> StagingFile:
        """A staged file written piece by piece (an upload arriving in chunks)."""
        return StagingFile(self.temp_path())

    def stage_copy(self, src: Path, progress: ProgressFn | None = None) -> Staged:
        with src.open("rb") as fh:
            return self.stage_stream(fh, src.stat().st_size, progress)

    def stage_move(self, src: Path, progress: ProgressFn | None = None) -> Staged:
        """Take over a file we own on the same disk (a finished download): move, then hash."""
        tmp = self.temp_path()
        os.replace(src, tmp)
        try:
            return Staged(tmp, sha256_file(tmp, progress), tmp.stat().st_size)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def commit(self, staged: Staged, expected: str | None = None) -> str:
        """Rename the staged file into place; a blob already stored is kept as is."""
        if expected and staged.digest != expected.lower():
            self.discard(staged)
            raise IntegrityError(f"sha256 mismatch: expected {expected}, got {staged.digest}")
        target = self.path(staged.digest)
        if target.exists():
            self.discard(staged)
        else:
            os.replace(staged.path, target)
            self.touch(staged.digest)
        return staged.digest

    def touch(self, digest: str) -> None:
        """Mark a blob as just stored: the sweep of blobs no model uses (`Registry.sweep_unused_blobs`)
        counts a blob's age from its mtime, so a blob being committed or registered is young."""
        os.utime(self.path(digest))

    def discard(self, staged: Staged) -> None:
        staged.path.unlink(missing_ok=True)

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)
        self._check_record(digest).unlink(missing_ok=True)

    def sweep_temp(self) -> list[Path]:
        """Remove temp files a crashed write left behind (their writer is gone); called when
        the registry opens."""
        swept = [p for p in self.root.glob(f"{TEMP_PREFIX}*") if p.is_file() and not _writer_alive(p.name)]
        for p in swept:
            p.unlink(missing_ok=True)
        return swept

    def digests(self) -> set[str]:
        return {p.name.removeprefix("sha256-") for p in self.root.iterdir() if _BLOB_RE.match(p.name)}


class StagingFile:
    """Bytes staged in pieces, hashed as they come: `write` each piece (on a worker thread),
    then `finish` (flushed to disk) or `discard`. `discard` may come from another thread while a
    `write` runs (its upload was cancelled): the lock lets that write end first, and a write after
    a discard fails instead of recreating the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._digest = hashlib.sha256()
        self._lock = threading.Lock()
        self._file: BinaryIO | None = path.open("wb")

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._file is None:
                raise ValueError("the staged file was discarded")
            self._file.write(data)
            self._digest.update(data)
            self.size += len(data)

    def finish(self) -> Staged:
        with self._lock:
            if self._file is None:
                raise ValueError("the staged file was discarded")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        return Staged(self.path, self._digest.hexdigest(), self.size)

    def discard(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        self.path.unlink(missing_ok=True)


def _writer_alive(name: str) -> bool:
    """Whether the process named in a temp file's name still runs. A name without a pid (or
    with this process's own, left by an earlier failure) counts as abandoned. A pid reused by
    an unrelated process keeps a leftover until that process ends, which costs only disk."""
    pid_text = name.removeprefix(TEMP_PREFIX).split("-", 1)[0]
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
