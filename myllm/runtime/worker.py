"""A loaded model's worker thread and its FIFO queue: "submit a job, get an async stream of
its events". Generation runs off the event loop, so the server keeps answering other
requests while a model generates.

A job is a function `(engine, cancel) -> iterator of events`. The worker runs one job at a
time; the batch engine (runtime/batching.py) offers the same `submit_generation` and runs
several sequences per step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from myllm.errors import Overloaded, ShuttingDown

T = TypeVar("T")
log = logging.getLogger(__name__)
JobFn = Callable[[Any, threading.Event], Iterator[T]]

_END = object()


def check_admission(closed: bool, waiting: int, max_queue: int) -> None:
    """Raise unless one more request may queue for a model. One rule for the plain worker and
    the batch engine, so a caller gets the same 503 (or "unloading") from either."""
    if closed:
        raise ShuttingDown("the model is being unloaded")
    if waiting >= max_queue:
        raise Overloaded(f"{waiting} requests are already waiting for this model; retry later")


@dataclass
class _Failure:
    error: BaseException


@dataclass
class Job(Generic[T]):
    fn: JobFn[T] | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    abort_error: BaseException | None = None
    """Set when the job is stopped by the server (unload, shutdown), not by its caller."""
    payload: Any = None
    """What a scheduler that takes requests rather than functions works from."""

    def push(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancel.set()


class JobStream(AsyncIterator[T]):
    """The caller's side of a job. Closing it (or dropping out of `async for` early) cancels
    the job: a queued job never starts, a running one stops within one token."""

    def __init__(self, job: Job[T]) -> None:
        self._job = job
        self._done = False

    def __aiter__(self) -> JobStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._job.events.get()
        except BaseException:
            self.cancel()
            raise
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.error
        return item

    def cancel(self) -> None:
        self._job.cancel.set()

    async def aclose(self) -> None:
        if not self._done:
            self.cancel()
            self._done = True


class ModelWorker:
    def __init__(self, engine: Any, name: str, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job[Any] | None] = queue.Queue()
        self._waiting = 0
        self._running = False
        self._current: Job[Any] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"model-{name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._waiting

    @property
    def busy(self) -> bool:
        return self._running or self._waiting > 0

    def submit(self, fn: JobFn[T]) -> JobStream[T]:
        with self._lock:
            check_admission(self._closed, self._waiting, self.max_queue)
            self._waiting += 1
        job: Job[T] = Job(fn, asyncio.get_running_loop())
        self._jobs.put(job)
        return JobStream(job)

    def submit_generation(self, req: Any) -> JobStream[Any]:
        """A generation request as a job: the engine generates it alone (no batching)."""
        return self.submit(lambda engine, cancel: engine.generate(dataclasses.replace(req, cancel=cancel)))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._waiting -= 1
                self._running = True
                self._current = job
            final: Any = _END
            try:
                if not job.cancel.is_set():
                    assert job.fn is not None
                    with closing(job.fn(self.engine, job.cancel)) as events:  # type: ignore[type-var]
                        for event in events:
                            if job.abort_error is not None:
                                break
                            job.push(event)
            except BaseException as exc:  # delivered to the caller, who maps it to an API error
                if not isinstance(exc, Exception):
                    log.exception("worker job failed")
                final = _Failure(exc)
            if job.abort_error is not None:
                final = _Failure(job.abort_error)
            with self._lock:  # idle before the caller hears the end, so it may unload at once
                self._running = False
                self._current = None
            job.push(final)

    def abort(self, error: BaseException) -> None:
        """Stop the running job within one token and fail queued ones; each caller's stream
        raises `error`."""
        with self._lock:
            current = self._current
        if current is not None:
            current.abort_error = error
            current.cancel.set()
        self._fail_queued(error)

    def _fail_queued(self, error: BaseException) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._jobs.put(None)
                break
            with self._lock:
                self._waiting -= 1
            job.push(_Failure(error))

    def close(self, timeout: float | None = None) -> None:
        """Stop taking jobs; queued jobs fail, the running one finishes (or is cancelled by its
        caller). Joins the thread."""
        with self._lock:
            self._closed = True
        self._fail_queued(ShuttingDown("the model was unloaded before this request started"))
        self._jobs.put(None)
        self._thread.join(timeout)
