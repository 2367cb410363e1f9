"""Crash back-off: a model whose runner keeps crashing is refused for a while instead of being
loaded again on every request.

A file whose hyperparameters abort llama.cpp on every request, or that takes its runner down while
loading, would otherwise crash-loop: each request starting a runner that dies, evicting other
models for it. `MYLLM_CRASH_LIMIT` crashes within `MYLLM_CRASH_WINDOW` while serving, or one while
loading, refuse the model (loading nothing, evicting nothing) for 30 s, doubling with each further
back-off up to 10 min; a model quiet for a whole window starts afresh. Crashes count by digest:
the file crashed llama.cpp, whatever name it was asked by.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from myllm.errors import ModelCrashed
from myllm.registry.schema import ModelRow

log = logging.getLogger(__name__)
CRASH_BACKOFF = 30.0
CRASH_BACKOFF_MAX = 600.0


@dataclass
class Crashes:
    """A model's recent runner crashes: refused until `until` once they are too many."""

    times: collections.deque[float] = field(default_factory=collections.deque)
    """When its runner crashed, within the crash window."""
    error: ModelCrashed | None = None
    """The last crash."""
    at_load: bool = False
    """Whether the last crash came while loading."""
    backoffs: int = 0
    """Back-offs since the model was last quiet for a window: each twice as long as the one before."""
    until: float = 0.0


class CrashBackoff:
    """The crashes of every model's runners, and the refusals they earn."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        """Crashes while serving, within `window` seconds, that start a back-off (`MYLLM_CRASH_LIMIT`)."""
        self.window = window
        self.by_digest: dict[str, Crashes] = {}

    def check(self, row: ModelRow) -> None:
        """Refuse a model in its crash back-off, saying why and until when (`Retry-After`)."""
        crashes = self.by_digest.get(row.digest)
        now = time.monotonic()
        if crashes is None or now >= crashes.until or crashes.error is None:
            return
        left = math.ceil(crashes.until - now)
        until = (datetime.now(timezone.utc) + timedelta(seconds=left)).strftime("%H:%M:%S UTC")
        if crashes.at_load:
            why = f"crashed its runner while loading {now - crashes.times[-1]:.0f}s ago"
        else:
            why = (f"crashed its runner {len(crashes.times)} times in the last {now - crashes.times[0]:.0f}s "
                   f"(MYLLM_CRASH_LIMIT is {self.limit})")
        raise ModelCrashed(f"model '{row.name}' {why} ({crashes.error.message}); not trying again for {left}s "
                           f"(until {until})", retry_after=left)

    def record(self, row: ModelRow, exc: ModelCrashed, at_load: bool) -> None:
        """Count a crash of `row`'s runner; a crash while loading, or the `limit`th within the
        window, starts a back-off twice as long as the last one (the model was not quiet for a
        whole window since)."""
        now = time.monotonic()
        crashes = self.by_digest.setdefault(row.digest, Crashes())
        while crashes.times and crashes.times[0] <= now - self.window:
            crashes.times.popleft()
        if not crashes.times and crashes.until <= now - self.window:
            crashes.backoffs = 0
        crashes.times.append(now)
        crashes.error, crashes.at_load = exc, at_load
        if at_load or len(crashes.times) >= self.limit:
            crashes.backoffs += 1
            crashes.until = now + min(CRASH_BACKOFF * 2 ** (crashes.backoffs - 1), CRASH_BACKOFF_MAX)
            log.error("%s; model %s refused for %.0fs", exc.message, row.name, crashes.until - now)
        else:
            log.error("%s", exc.message)
