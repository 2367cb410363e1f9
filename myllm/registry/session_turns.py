"""One turn at a time per stored session: a turn reads the session's history, generates and
stores its messages; two at once would both read the same history and interleave or lose
their writes. Daemons sharing a database each see the other's turns through the session's
claim in the database (`SessionStore.claim`); on one daemon, a second request on a busy
session first waits in line here, without asking the database. Either wait lasts at most
MYLLM_TURN_WAIT, then the turn is `SessionBusy` (409)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from myllm.errors import SessionBusy, StoreUnavailable
from myllm.pools import Pool
from myllm.registry.sessions import ADMIN, SessionStore, Viewer, resolve

log = logging.getLogger(__name__)

POLL = (0.05, 0.5)
"""First and longest pause between claims of a session another daemon's turn holds."""


@dataclass
class Turn:
    """A claimed turn. `holder` goes with the turn's messages into the store, which ends the
    claim in the same transaction; `release` ends a turn that stored nothing (idempotent, and
    safe to call after the store)."""

    session_id: str
    holder: str
    viewer: Viewer
    key: str
    """Where the session is kept (`resolve`): two keys' sessions of one id are two lines."""
    _locks: TurnLocks
    _lock: asyncio.Lock
    _done: bool = field(default=False)

    def release(self) -> None:
        if self._done:
            return
        self._done = True
        self._locks.finish(self)


class TurnLocks:
    def __init__(self, store: SessionStore, replica: str, wait: float, lease: float, pool: Pool) -> None:
        self.store = store
        self.pool = pool
        """Where the session store's calls run (the database pool)."""
        self.replica = replica
        self.wait = wait
        self.lease = lease
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}
        self._running: dict[str, Turn] = {}
        """Claims held now, by holder: renewed until their turn ends."""

    async def acquire(self, session_id: str, kind: str, model: str, viewer: Viewer = ADMIN) -> Turn:
        """Wait for the session's turn and claim it (creating the session if it is new)."""
        deadline = time.monotonic() + self.wait
        key = resolve(session_id, viewer)
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            await asyncio.wait_for(lock.acquire(), self.wait)
        except BaseException as exc:
            self._drop(key)
            if isinstance(exc, TimeoutError):
                raise self._busy(session_id, "a turn on this daemon") from None
            raise
        turn = Turn(session_id, f"{uuid.uuid4().hex[:16]}@{self.replica}"[:64], viewer, key, self, lock)
        try:
            pause = POLL[0]
            while (other := await self.pool.run(self.store.claim, session_id, kind, model, turn.holder,
                                                 self.lease, viewer)) is not None:
                if time.monotonic() + pause > deadline:
                    raise self._busy(session_id, f"a turn on {other.partition('@')[2] or 'another daemon'}")
                await asyncio.sleep(pause)
                pause = min(pause * 2, POLL[1])
        except BaseException:
            turn._done = True
            self._unlock(turn)
            raise
        self._running[turn.holder] = turn
        return turn

    def _busy(self, session_id: str, where: str) -> SessionBusy:
        return SessionBusy(f"session '{session_id}' is busy: {where} has been running for longer than this turn may "
                           f"wait ({self.wait:g} s, MYLLM_TURN_WAIT); send it again when that turn has ended")

    def finish(self, turn: Turn) -> None:
        """Free the turn's claim in the database (in the background: a stored turn's is already
        free, and a claim left behind by a failure here lapses on its own), then its place in line."""
        self._running.pop(turn.holder, None)
        self._unlock(turn)
        self.pool.submit(self._release, turn)

    def _release(self, turn: Turn) -> None:
        try:
            self.store.release(turn.session_id, turn.holder, turn.viewer)
        except StoreUnavailable:
            log.warning("could not free the claim on session %s (the database is unavailable); it lapses in %g s",
                        turn.session_id, self.lease)

    def _unlock(self, turn: Turn) -> None:
        turn._lock.release()
        self._drop(turn.key)

    def _drop(self, key: str) -> None:
        self._users[key] -= 1
        if not self._users[key]:
            del self._users[key]
            del self._locks[key]

    async def renew_forever(self) -> None:
        """Renew the running turns' claims every third of their lease, so that only a daemon that
        stopped renewing (it died, or lost the database) loses them."""
        while True:
            await asyncio.sleep(self.lease / 3)
            holders = list(self._running)
            if holders:
                try:
                    await self.pool.run(self.store.renew, holders, self.lease)
                except StoreUnavailable:  # try again next round: the claims last two more
                    log.warning("could not renew %d turn claims (the database is unavailable)", len(holders))

    def __len__(self) -> int:
        return len(self._locks)
