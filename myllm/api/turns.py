"""One turn at a time per stored session: a turn reads the session's history, generates and
stores its messages; two at once would both read the same history and interleave or lose
their writes. A second request on a busy session waits for the first one's turn to be stored."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class TurnLocks:
    """An asyncio lock per session id, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    async def acquire(self, session_id: str) -> Callable[[], None]:
        """Wait for the session's turn; returns the release (idempotent), to be called once the
        turn is stored or has failed (for a stream: when the stream ends)."""
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        self._users[session_id] = self._users.get(session_id, 0) + 1
        try:
            await lock.acquire()
        except BaseException:
            self._drop(session_id)
            raise
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                lock.release()
                self._drop(session_id)

        return release

    def _drop(self, session_id: str) -> None:
        self._users[session_id] -= 1
        if not self._users[session_id]:
            del self._users[session_id]
            del self._locks[session_id]

    def __len__(self) -> int:
        return len(self._locks)
