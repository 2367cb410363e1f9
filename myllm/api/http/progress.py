"""Blocking work that reports progress (a pull) run on a pool thread, its progress handed to
the event loop as it comes, so a route can stream it without blocking the loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

from myllm.pools import Pool
from myllm.pull.progress import PullProgress

T = TypeVar("T")
Update = tuple[str, int, int | None]
"""(stage, done, total), as `PullProgress` is called."""


class ProgressWork(Generic[T]):
    """`work(progress)` started on `pool` at once (in line behind the pool's other work). It runs to its end even when nobody
    listens any more (a client that left): a thread cannot be stopped midway, and the pull
    functions clean up only when they end."""

    def __init__(self, work: Callable[[PullProgress], T], pool: Pool) -> None:
        loop = asyncio.get_running_loop()
        self._updates: asyncio.Queue[Update | None] = asyncio.Queue()

        def progress(stage: str, done: int, total: int | None) -> None:
            loop.call_soon_threadsafe(self._updates.put_nowait, (stage, done, total))

        self._task = asyncio.ensure_future(pool.run(work, progress))
        # Scheduled after every update the thread sent, so the queue ends after them.
        self._task.add_done_callback(lambda task: self._updates.put_nowait(None))

    async def updates(self) -> AsyncIterator[Update]:
        """Each update as the work reports it; at the end the work's error, if it failed."""
        while (update := await self._updates.get()) is not None:
            yield update
        await self._task

    async def result(self) -> T:
        return await self._task
