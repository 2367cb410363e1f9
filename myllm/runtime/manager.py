"""Which models are loaded: leases, an LRU memory budget, keep-alive, one load at a time.

A request takes a *lease* on a loaded instance (loading it if needed) and returns it when
done. An instance with leases is never unloaded; its keep-alive timer starts when the last
lease is returned. When a load would not fit the budget (or the instance limit), idle
instances go first, least recently used first; if busy ones hold the memory the load waits
(up to the load timeout) for them to finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from myllm.errors import ModelBroken, ModelNotLoaded, OutOfMemory, ShuttingDown
from myllm.registry.schema import ModelRow
from myllm.registry.store import Registry
from myllm.runtime.durations import parse_duration
from myllm.runtime.batching import BatchEngine
from myllm.runtime.engine import LlamaEngine, LoadSpec
from myllm.runtime.memory import MiB, MemoryEstimate, estimate, parse_memory, release_freed_memory, rss
from myllm.runtime.worker import ModelWorker
from myllm.settings import Settings

log = logging.getLogger(__name__)
EngineFactory = Callable[[LoadSpec, int | None, int], LlamaEngine]
"""(spec, threads, KV-cache bytes) -> engine."""


@dataclass
class Instance:
    spec: LoadSpec
    row: ModelRow
    engine: Any
    """A LlamaEngine, or a BatchEngine (which is then also the worker)."""
    worker: Any
    estimate: MemoryEstimate
    rss_before: int
    rss_after: int
    keep_alive: float
    leases: int = 0
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float | None = None
    """Monotonic deadline while idle; None while leased or kept forever."""
    retired: bool = False
    """Unloaded while a request still held it: the engine closes when the last lease goes."""

    @property
    def idle(self) -> bool:
        return self.leases == 0 and not self.worker.busy


@dataclass(frozen=True)
class LoadedInfo:
    name: str
    digest: str
    context_length: int
    embedding: bool
    size_estimate: int
    rss_before: int
    rss_after: int
    expires_at: datetime | None
    device: str
    active: int
    queued: int

    @property
    def rss_growth(self) -> int:
        return self.rss_after - self.rss_before


class Lease:
    """The right to use one loaded instance for one request. Release exactly once."""

    def __init__(self, manager: ModelManager, instance: Instance, keep_alive: float | None) -> None:
        self._manager = manager
        self.instance = instance
        self.keep_alive = keep_alive
        self._released = False

    @property
    def engine(self) -> Any:
        return self.instance.engine

    @property
    def worker(self) -> Any:
        return self.instance.worker

    @property
    def row(self) -> ModelRow:
        return self.instance.row

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._manager._release(self.instance, self.keep_alive)


class ModelManager:
    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        engine_factory: EngineFactory | None = None,
        budget: int | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.budget = budget if budget is not None else parse_memory(settings.max_memory)
        self.default_keep_alive = parse_duration(settings.keep_alive)
        self.load_timeout = parse_duration(settings.load_timeout, "load_timeout")
        self.kv_cache_bytes = None if settings.kv_cache.strip().lower() == "auto" else parse_memory(settings.kv_cache)
        """RAM for saved conversation KV states per model; None: as much as the model's context KV."""
        self._factory = engine_factory
        self._instances: dict[LoadSpec, Instance] = {}
        self._loading: dict[LoadSpec, asyncio.Future[Instance]] = {}
        self._load_lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False
        self.load_count = 0

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the background task that unloads expired idle instances."""
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever(), name="myllm-keepalive")

    async def close(self) -> None:
        """Stop everything: running requests end with `ShuttingDown`, then every engine is
        closed (each once its last request has let go of it, within a few seconds)."""
        self._closing = True
        self.abort_all(ShuttingDown("the server is shutting down"))
        if self._reaper:
            self._reaper.cancel()
            try:
                await self._reaper
            except asyncio.CancelledError:
                pass
        instances = list(self._instances.values())
        for inst in instances:
            await self._unload(inst)
        deadline = time.monotonic() + 10
        while any(i.leases for i in instances) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def abort_all(self, error: BaseException) -> None:
        """Stop every running and queued request now; their streams raise `error`."""
        for inst in self._instances.values():
            inst.worker.abort(error)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self._next_wakeup())
            await self.reap()

    def _next_wakeup(self) -> float:
        deadlines = [i.expires_at for i in self._instances.values() if i.expires_at is not None]
        if not deadlines:
            return 1.0
        return min(1.0, max(0.01, min(deadlines) - time.monotonic()))

    async def reap(self) -> list[str]:
        now = time.monotonic()
        expired = [i for i in self._instances.values() if i.idle and i.expires_at is not None and i.expires_at <= now]
        for inst in expired:
            await self._unload(inst)
        return [i.spec.name for i in expired]

    # -- leases --------------------------------------------------------------------

    def spec_for(self, row: ModelRow, num_ctx: int | None = None, embedding: bool = False) -> LoadSpec:
        wanted = num_ctx or int((row.parameters or {}).get("num_ctx") or self.settings.num_ctx)
        parallel = 1 if self._factory is not None else self.settings.num_parallel
        return LoadSpec.for_model(row, wanted, embedding=embedding, n_parallel=parallel)

    async def acquire(
        self,
        model: str | ModelRow,
        keep_alive: str | float | None = None,
        num_ctx: int | None = None,
        embedding: bool = False,
    ) -> Lease:
        """A lease on a loaded instance of `model` (a name, or the row a caller has already
        looked up), loading it first if needed. Concurrent acquires of the same unloaded model
        share one load."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        ka = None if keep_alive is None else parse_duration(keep_alive)
        row = model if isinstance(model, ModelRow) else await asyncio.to_thread(self.registry.get, model)
        spec = self.spec_for(row, num_ctx, embedding)
        inst = self._instances.get(spec)
        if inst is None:
            inst = await self._load_shared(spec, row)
        inst.leases += 1
        inst.expires_at = None
        inst.last_used = time.monotonic()
        return Lease(self, inst, ka)

    def _release(self, inst: Instance, keep_alive: float | None) -> None:
        inst.leases -= 1
        inst.last_used = time.monotonic()
        if inst.retired:
            if inst.leases == 0:
                asyncio.get_running_loop().create_task(self._close_engine(inst))
            return
        if keep_alive is not None:
            inst.keep_alive = keep_alive
        if inst.leases == 0:
            inst.expires_at = None if inst.keep_alive < 0 else inst.last_used + inst.keep_alive
        asyncio.get_running_loop().create_task(self._after_release(inst))

    async def _after_release(self, inst: Instance) -> None:
        if inst.keep_alive == 0 and inst.leases == 0:
            await self.reap()
        async with self._changed:
            self._changed.notify_all()

    # -- loading -------------------------------------------------------------------

    async def _load_shared(self, spec: LoadSpec, row: ModelRow) -> Instance:
        pending = self._loading.get(spec)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
        self._loading[spec] = fut
        try:
            inst = await self._load(spec, row)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved here; waiters re-raise it themselves
            raise
        finally:
            del self._loading[spec]
        fut.set_result(inst)
        return inst

    def used(self) -> int:
        return sum(i.estimate.total for i in self._instances.values())

    async def _load(self, spec: LoadSpec, row: ModelRow) -> Instance:
        problem = await asyncio.to_thread(self.registry.problem, row)
        if problem:
            raise ModelBroken(f"model '{row.name}' is broken: {problem}; pull it again")
        need = estimate(row, spec.n_ctx * spec.n_parallel, spec.embedding, self._saved_kv_bytes(row, spec))
        if need.total > self.budget:
            raise OutOfMemory(
                f"model '{spec.name}' needs about {need.total // MiB} MiB (weights {need.weights // MiB}, "
                f"KV cache {need.kv_cache // MiB}, compute {need.compute // MiB}) with {spec.n_parallel} x "
                f"{spec.n_ctx}-token context, more than the whole memory budget of {self.budget // MiB} MiB",
                needed=need.total,
                budget=self.budget,
            )
        async with self._load_lock:
            if (inst := self._instances.get(spec)) is not None:
                return inst
            await self._wait_for_room(spec, need)
            try:
                return await self._create(spec, row, need)
            except OutOfMemory:
                # The estimate said it fits but llama.cpp could not allocate: free what is idle, retry once.
                if not await self._evict_idle(need=None):
                    raise
                return await self._create(spec, row, need)

    async def _create(self, spec: LoadSpec, row: ModelRow, need: MemoryEstimate) -> Instance:
        before = rss()
        engine, worker = await asyncio.to_thread(self._make_engine, spec, self._saved_kv_bytes(row, spec))
        after = rss()
        inst = Instance(spec, row, engine, worker, need, before, after, self.default_keep_alive)
        self._instances[spec] = inst
        self.load_count += 1
        log.info(
            "loaded %s (ctx %d): estimate %d MiB, RSS +%d MiB",
            spec.name, spec.n_ctx, need.total // MiB, (after - before) // MiB,
        )
        return inst

    def _saved_kv_bytes(self, row: ModelRow, spec: LoadSpec) -> int:
        """The engine's RAM cache of conversation KV states (counted in the load estimate). By
        default as large as the context's own KV: a fixed size would hold dozens of conversations
        of a small model and not one of a 7B model's."""
        if spec.embedding:
            return 0
        if self.kv_cache_bytes is None:
            return estimate(row, spec.n_ctx * spec.n_parallel).kv_cache
        return self.kv_cache_bytes

    def _make_engine(self, spec: LoadSpec, kv_bytes: int) -> tuple[Any, Any]:
        """A batching engine (its own scheduler) for generation with several sequences; a plain
        engine with a FIFO worker thread for one sequence, embeddings, or a test's factory."""
        threads = self.settings.num_threads
        if self._factory is not None:
            engine = self._factory(spec, threads, kv_bytes)
        elif spec.n_parallel > 1:
            batched = BatchEngine(spec, threads, kv_bytes, spec.n_parallel, self.settings.max_queue)
            return batched, batched
        else:
            engine = LlamaEngine(spec, threads, kv_bytes)
        return engine, ModelWorker(engine, spec.name, self.settings.max_queue)

    def _fits(self, need: MemoryEstimate) -> bool:
        return (
            self.used() + need.total <= self.budget
            and len(self._instances) < self.settings.max_loaded_models
        )

    async def _evict_idle(self, need: MemoryEstimate | None) -> bool:
        """Unload idle instances, least recently used first, until `need` fits (or all of
        them, when `need` is None). Returns whether anything was unloaded."""
        victims = sorted((i for i in self._instances.values() if i.idle), key=lambda i: i.last_used)
        evicted = False
        for inst in victims:
            if need is not None and self._fits(need):
                break
            await self._unload(inst)
            evicted = True
        return evicted

    async def _wait_for_room(self, spec: LoadSpec, need: MemoryEstimate) -> None:
        deadline = time.monotonic() + self.load_timeout
        while True:
            await self._evict_idle(need)
            if self._fits(need):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                busy = ", ".join(sorted(i.spec.name for i in self._instances.values()))
                raise OutOfMemory(
                    f"model '{spec.name}' needs about {need.total // MiB} MiB but only "
                    f"{max(0, self.budget - self.used()) // MiB} MiB of the {self.budget // MiB} MiB budget "
                    f"is free and the loaded models are busy ({busy}); waited {self.load_timeout:.0f}s",
                    needed=need.total,
                    budget=self.budget,
                )
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=min(left, 1.0))
                except TimeoutError:
                    pass

    async def _unload(self, inst: Instance) -> None:
        if self._instances.get(inst.spec) is not inst:
            return
        del self._instances[inst.spec]
        await asyncio.to_thread(inst.worker.close)
        if inst.leases:
            # A request still holds it (e.g. tokenizing in a thread): closing the engine under
            # it would crash llama.cpp, so the last lease closes it.
            inst.retired = True
        else:
            await self._close_engine(inst)
        async with self._changed:
            self._changed.notify_all()

    async def _close_engine(self, inst: Instance) -> None:
        await asyncio.to_thread(inst.engine.close)
        release_freed_memory()
        log.info("unloaded %s", inst.spec.name)

    # -- explicit control ------------------------------------------------------------

    async def load(self, name: str, keep_alive: str | float | None = None) -> LoadedInfo:
        lease = await self.acquire(name, keep_alive=keep_alive)
        info = self._info(lease.instance)
        lease.release()
        return info

    async def unload(self, name: str, abort: bool = False) -> int:
        """Unload every instance of `name`. Idle ones go now; busy ones as soon as their
        requests finish, or at once with `abort`, their requests failing with
        `ModelNotLoaded`. Returns how many instances were affected."""
        row = await asyncio.to_thread(self.registry.get, name)
        hits = [i for i in self._instances.values() if i.spec.name == row.name]
        for inst in hits:
            inst.keep_alive = 0
            if abort and not inst.idle:
                inst.worker.abort(ModelNotLoaded(f"model '{row.name}' was unloaded while this request ran"))
                await self._unload(inst)
            elif inst.idle:
                await self._unload(inst)
            else:
                inst.expires_at = time.monotonic()
        return len(hits)

    def is_loaded(self, name: str) -> bool:
        return any(i.spec.name == name for i in self._instances.values())

    def loaded(self) -> list[LoadedInfo]:
        return [self._info(i) for i in sorted(self._instances.values(), key=lambda i: i.spec.name)]

    def _info(self, inst: Instance) -> LoadedInfo:
        expires = None
        if inst.leases == 0 and inst.expires_at is not None:
            expires = datetime.now(timezone.utc) + timedelta(seconds=inst.expires_at - time.monotonic())
        elif inst.leases > 0 and inst.keep_alive >= 0:
            expires = datetime.now(timezone.utc) + timedelta(seconds=inst.keep_alive)
        return LoadedInfo(
            name=inst.spec.name,
            digest=inst.row.digest,
            context_length=inst.spec.n_ctx,
            embedding=inst.spec.embedding,
            size_estimate=inst.estimate.total,
            rss_before=inst.rss_before,
            rss_after=inst.rss_after,
            expires_at=expires,
            device="gpu" if inst.spec.n_gpu_layers else "cpu",
            active=inst.leases,
            queued=inst.worker.queued,
        )
