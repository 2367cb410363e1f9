"""Named, bounded thread pools: where blocking work (database calls, blob I/O, pulls) runs off
the event loop, each kind on threads of its own.

asyncio's default executor (`asyncio.to_thread`) is one pool of `min(32, cores + 4)` threads
shared by everything: six uploads that stall, or six pulls, take it whole and every route that
reads the database waits behind them. So nothing in myllm uses it: each kind of blocking work
gets a `Pool` of its own, with its own threads and its own bounded line (past it, `Overloaded`,
a 503 with Retry-After), and one pool's backlog never takes the threads another needs. The
daemon's pools are one `Pools` bundle, built from the settings where the registry is opened
(`Registry.open`), so every layer that holds the registry reaches them.

This module sits beside `settings` and `errors`: every layer may import it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from myllm.errors import Overloaded, ShuttingDown
from myllm.settings import Settings

T = TypeVar("T")
P = ParamSpec("P")
log = logging.getLogger(__name__)
_Done = Callable[[Any, BaseException | None], None]


class Pool:
    """Up to `threads` daemon threads (started as work comes) and a line of at most
    `max_waiting` calls. Daemon threads, because a thread cannot be stopped from outside and a
    call stuck on a dead disk or database must not hold up the daemon's exit."""

    def __init__(self, name: str, threads: int, max_waiting: int) -> None:
        self.name = name
        self.threads = threads
        self.max_waiting = max_waiting
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], _Done] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        """Calls queued or running."""
        self._workers: list[threading.Thread] = []
        self._closed = False

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` on one of the pool's threads, in the caller's context
        (contextvars). A caller that is cancelled stops waiting; the call itself runs to its end
        (its result is dropped), as with `asyncio.to_thread`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(settle, future, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        self._put(call, done)
        return await future

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """`fn(*args)` on the pool, nobody waiting for it: clean-up that must happen even when its
        caller was cancelled, so it is queued past `max_waiting` (it is bounded by the work that
        made it). A failure is logged; after `close` it is dropped with a log line."""

        def done(_result: Any, error: BaseException | None) -> None:
            if error is not None:
                log.warning("%s pool: %s failed: %s", self.name, getattr(fn, "__name__", fn), error)

        try:
            self._put(functools.partial(fn, *args), done, bounded=False)
        except ShuttingDown:
            log.warning("%s pool: %s dropped, the pool is closed", self.name, getattr(fn, "__name__", fn))

    def close(self) -> None:
        """Let the threads end once the line is empty; later calls are `ShuttingDown`."""
        with self._lock:
            self._closed = True
            for _ in self._workers:
                self._jobs.put(None)

    def _put(self, call: Callable[[], Any], done: _Done, bounded: bool = True) -> None:
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if bounded and self._pending >= self.threads + self.max_waiting:
                raise Overloaded(f"{self._pending} {self.name} calls are running or waiting; try again shortly")
            self._pending += 1
            if self._pending > len(self._workers) and len(self._workers) < self.threads:
                worker = threading.Thread(target=self._work, name=f"{self.name}-{len(self._workers)}", daemon=True)
                self._workers.append(worker)
                worker.start()
            self._jobs.put((call, done))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            call, done = job
            result: Any = None
            error: BaseException | None = None
            try:
                result = call()
            except BaseException as exc:  # noqa: BLE001 (handed to the caller, whatever it is)
                error = exc
            with self._lock:  # before the caller hears: its place is free when it does
                self._pending -= 1
            done(result, error)


def settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Hand a worker thread's outcome to the future its caller awaits (on the loop's thread)."""
    if future.done():  # the caller left
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclass(frozen=True)
class Pools:
    """The daemon's pools. `db`: every database call (registry, sessions, responses, choices).
    `blobs`: blob I/O (hashing, checking and reading model files, writing uploads, registering
    an uploaded blob, sweeping). `pulls`: pulls, each holding its thread for its whole download."""

    db: Pool
    blobs: Pool
    pulls: Pool

    @classmethod
    def from_settings(cls, settings: Settings) -> Pools:
        return cls(
            db=Pool("database", settings.db_threads, settings.pool_queue),
            blobs=Pool("blob", settings.blob_threads, settings.pool_queue),
            pulls=Pool("pull", settings.max_pulls, settings.pool_queue),
        )

    @property
    def connections(self) -> int:
        """Threads that may call the database at once: each pool's (blob and pull work registers
        models), what a server database's connection pool keeps open (`registry/db.py`)."""
        return self.db.threads + self.blobs.threads + self.pulls.threads

    def close(self) -> None:
        for pool in (self.db, self.blobs, self.pulls):
            pool.close()
