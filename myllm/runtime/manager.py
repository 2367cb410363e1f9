"""Which models are loaded: leases, an LRU memory budget, keep-alive, one load at a time.

Each loaded instance is a runner process (runtime/runner/). A request takes a *lease* on a
loaded instance (loading it if needed) and returns it when done. An instance with leases is never unloaded; its keep-alive timer starts when the last
lease is returned. When a load would not fit the budget (or the instance limit), idle
instances go first, least recently used first; if busy ones hold the memory the load waits
(up to the load timeout) for them to finish. Memory is counted per instance as the larger of
its estimate and its runner's measured RSS.

A runner that dies takes only its instance: the manager forgets it (its requests have already
failed with `ModelCrashed`) and the next request loads a fresh one. A model whose load crashes
its runner is refused for a while (30 s, doubling up to 10 min) instead of crash-looping.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from datetime import datetime, timedelta, timezone

from myllm.errors import ModelCrashed, ModelNotLoaded, MyLLMError, OutOfMemory, ShuttingDown
from myllm.registry.schema import ModelRow
from myllm.registry.store import Registry
from myllm.runtime.durations import parse_duration
from myllm.runtime.engine import LoadSpec
from myllm.runtime.events import RuntimeEvents
from myllm.runtime.memory import MiB, MemoryEstimate, estimate, parse_memory
from myllm.runtime.runner import ModelRunner
from myllm.runtime.runner.protocol import RunnerConfig
from myllm.settings import Settings

log = logging.getLogger(__name__)
RunnerFactory = Callable[[RunnerConfig, int], Awaitable[Any]]
"""(what to load, queue limit) -> a started runner: `ModelRunner.start`, or a unit test's fake."""
CRASH_BACKOFF = 30.0
CRASH_BACKOFF_MAX = 600.0
STALL_LIMIT = 120.0
"""A scheduler step running this long is stuck: a prompt chunk takes seconds, not minutes."""
INCIDENT_MEMORY = 60.0
"""How long a restart after a failed health check counts as a problem for readiness."""


@dataclass(frozen=True)
class Incident:
    at: float
    model: str
    problem: str


@dataclass
class LoadCrash:
    """A model whose load crashed its runner: refused until `until`."""

    error: ModelCrashed
    at: float
    until: float
    count: int


@dataclass
class Instance:
    spec: LoadSpec
    row: ModelRow
    runner: Any
    """A `ModelRunner` (a test's fake in unit tests of the manager's logic)."""
    estimate: MemoryEstimate
    keep_alive: float
    leases: int = 0
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float | None = None
    """Monotonic deadline while idle; None while leased or kept forever."""

    @property
    def idle(self) -> bool:
        return self.leases == 0 and not self.runner.busy

    @property
    def charged(self) -> int:
        """What counts against the budget: the estimate, or the runner's RSS if larger."""
        return max(self.estimate.total, self.runner.rss())


@dataclass(frozen=True)
class LoadedInfo:
    name: str
    digest: str
    context_length: int
    embedding: bool
    size_estimate: int
    rss_before: int
    rss_after: int
    """The runner's RSS before and after loading the model."""
    rss: int
    """The runner's RSS now."""
    pid: int | None
    expires_at: datetime | None
    device: str
    active: int
    queued: int
    busy: int
    """Sequences generating now, of `slots`."""
    slots: int

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
    def runner(self) -> Any:
        return self.instance.runner

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
        runner_factory: RunnerFactory | None = None,
        budget: int | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.budget = budget if budget is not None else parse_memory(settings.max_memory)
        self.default_keep_alive = parse_duration(settings.keep_alive)
        self.load_timeout = parse_duration(settings.load_timeout, "load_timeout")
        self.kv_cache_bytes = None if settings.kv_cache.strip().lower() == "auto" else parse_memory(settings.kv_cache)
        """RAM for saved conversation KV states per model; None: as much as the model's context KV."""
        self._factory: RunnerFactory = runner_factory or ModelRunner.start
        self._crashes: dict[str, LoadCrash] = {}
        """Load crashes by model digest (the file crashed llama.cpp, whatever its name)."""
        self._instances: dict[LoadSpec, Instance] = {}
        self._loading: dict[LoadSpec, asyncio.Future[Instance]] = {}
        self._load_lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._reaper: asyncio.Task[None] | None = None
        self._checker: asyncio.Task[None] | None = None
        self.events = RuntimeEvents()
        """Told of loads and unloads (the daemon puts its metrics here)."""
        self.incidents: collections.deque[Incident] = collections.deque(maxlen=32)
        """Runners restarted after a failed health check, the latest last."""
        self._closing = False
        self.load_count = 0

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the background tasks: unloading expired idle instances, checking runners."""
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever(), name="myllm-keepalive")
            self._checker = asyncio.create_task(self._check_forever(), name="myllm-health")

    async def close(self) -> None:
        """Stop everything: running requests end with `ShuttingDown`, then every runner exits."""
        self._closing = True
        self.abort_all(ShuttingDown("the server is shutting down"))
        for task in (self._reaper, self._checker):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        await asyncio.gather(*(self._unload(inst) for inst in list(self._instances.values())))

    def abort_all(self, error: BaseException) -> None:
        """Stop every running and queued request now; their streams raise `error`."""
        for inst in self._instances.values():
            inst.runner.abort(error)

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
            await self._unload(inst, "keep_alive")
        return [i.spec.name for i in expired]

    # -- health ------------------------------------------------------------------------

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            await self.check_health()

    async def check_health(self) -> list[Incident]:
        """Ask every runner at once how it is; one that is stuck, or whose scheduler died or
        stalled, is killed (its requests fail with `ModelCrashed` saying why) and forgotten, so
        the next request loads the model afresh. A runner that merely died is handled by its exit."""
        instances = list(self._instances.values())
        answers = await asyncio.gather(
            *(inst.runner.health(2 * self.settings.health_interval, STALL_LIMIT) for inst in instances),
            return_exceptions=True,
        )
        found = []
        for inst, problem in zip(instances, answers):
            if isinstance(problem, BaseException):
                log.error("health check of %s failed: %r", inst.spec.name, problem)
            elif problem:
                log.error("model %s %s; restarting its runner", inst.spec.name, problem)
                found.append(Incident(time.monotonic(), inst.spec.name, problem))
                inst.runner.kill(problem)
        self.incidents.extend(found)
        return found

    def problems(self) -> list[str]:
        """What readiness reports: restarts after a failed health check, for a minute."""
        now = time.monotonic()
        return [
            f"model '{i.model}' {i.problem}; its runner was restarted {now - i.at:.0f} s ago"
            for i in self.incidents if now - i.at < INCIDENT_MEMORY
        ]

    # -- leases --------------------------------------------------------------------

    def spec_for(self, row: ModelRow, num_ctx: int | None = None, embedding: bool = False) -> LoadSpec:
        wanted = num_ctx or int((row.parameters or {}).get("num_ctx") or self.settings.num_ctx)
        return LoadSpec.for_model(row, self.registry.blobs.path(row.digest), wanted, embedding=embedding,
                                  n_parallel=self.settings.num_parallel)

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
        if self._instances.get(inst.spec) is not inst:  # unloaded, or its runner died
            return
        if keep_alive is not None:
            inst.keep_alive = keep_alive
        if inst.leases == 0:
            inst.expires_at = None if inst.keep_alive < 0 else inst.last_used + inst.keep_alive
        asyncio.get_running_loop().create_task(self._after_release(inst))

    async def _after_release(self, inst: Instance) -> None:
        if inst.keep_alive == 0 and inst.leases == 0:
            await self.reap()
        await self._notify()

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
        return sum(i.charged for i in self._instances.values())

    async def _load(self, spec: LoadSpec, row: ModelRow) -> Instance:
        self._check_crashes(row)
        await asyncio.to_thread(self.registry.blob_file, row)
        need = estimate(row, spec.n_ctx * spec.n_parallel, spec.embedding, self._saved_kv_bytes(row, spec))
        if need.total > self.budget:
            raise OutOfMemory(
                f"model '{spec.name}' needs about {need.total // MiB} MiB (runner {need.process // MiB}, weights {need.weights // MiB}, "
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

    def _check_crashes(self, row: ModelRow) -> None:
        crash = self._crashes.get(row.digest)
        now = time.monotonic()
        if crash is not None and now < crash.until:
            raise ModelCrashed(
                f"model '{row.name}' crashed its runner while loading {now - crash.at:.0f}s ago "
                f"({crash.error.message}); not trying again for {crash.until - now:.0f}s"
            )

    async def _create(self, spec: LoadSpec, row: ModelRow, need: MemoryEstimate) -> Instance:
        config = RunnerConfig(spec, self.settings.num_threads, self._saved_kv_bytes(row, spec))
        started = time.perf_counter()
        try:
            runner = await self._factory(config, self.settings.max_queue)
        except ModelCrashed as exc:
            previous = self._crashes.get(row.digest)
            count = previous.count + 1 if previous else 1
            now = time.monotonic()
            self._crashes[row.digest] = LoadCrash(exc, now, now + min(CRASH_BACKOFF * 2 ** (count - 1), CRASH_BACKOFF_MAX), count)
            log.error("%s", exc.message)
            raise
        self._crashes.pop(row.digest, None)
        inst = Instance(spec, row, runner, need, self.default_keep_alive)
        runner.on_exit = self._runner_exited
        self._instances[spec] = inst
        self.load_count += 1
        self.events.model_loaded(spec.name, time.perf_counter() - started)
        log.info(
            "loaded %s (ctx %d) in runner %s: estimate %d MiB, runner RSS %d MiB",
            spec.name, spec.n_ctx, getattr(runner, "pid", None), need.total // MiB, runner.rss() // MiB,
        )
        return inst

    def _runner_exited(self, runner: Any, error: MyLLMError) -> None:
        """A runner died on its own: forget its instance (its requests have failed already),
        so the next request loads a fresh one."""
        for spec, inst in list(self._instances.items()):
            if inst.runner is runner:
                del self._instances[spec]
                log.warning("model %s is no longer loaded: %s", spec.name, error.message)
                self.events.model_unloaded(spec.name, "crash")
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _saved_kv_bytes(self, row: ModelRow, spec: LoadSpec) -> int:
        """The engine's RAM cache of conversation KV states (counted in the load estimate). By
        default as large as the context's own KV: a fixed size would hold dozens of conversations
        of a small model and not one of a 7B model's."""
        if spec.embedding:
            return 0
        if self.kv_cache_bytes is None:
            return estimate(row, spec.n_ctx * spec.n_parallel).kv_cache
        return self.kv_cache_bytes

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
            await self._unload(inst, "lru")
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

    async def _unload(self, inst: Instance, reason: str = "unload") -> None:
        if self._instances.get(inst.spec) is not inst:
            return
        del self._instances[inst.spec]
        await inst.runner.close()
        log.info("unloaded %s (%s)", inst.spec.name, reason)
        self.events.model_unloaded(inst.spec.name, reason)
        await self._notify()

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
                inst.runner.abort(ModelNotLoaded(f"model '{row.name}' was unloaded while this request ran"))
                await self._unload(inst)
            elif inst.idle:
                await self._unload(inst)
            else:
                inst.expires_at = time.monotonic()
        return len(hits)

    def is_loaded(self, name: str) -> bool:
        return any(i.spec.name == name for i in self._instances.values())

    async def runner_stats(self, name: str) -> dict[str, Any]:
        """The figures `name`'s runner reports about itself (a model loaded twice: the first)."""
        inst = next((i for i in self._instances.values() if i.spec.name == name), None)
        if inst is None:
            raise ModelNotLoaded(f"model '{name}' is not loaded")
        return await asyncio.wait_for(inst.runner.stats(), timeout=5)  # type: ignore[no-any-return]

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
            rss_before=inst.runner.rss_before,
            rss_after=inst.runner.rss_after,
            rss=inst.runner.rss(),
            pid=getattr(inst.runner, "pid", None),
            expires_at=expires,
            device="gpu" if inst.spec.n_gpu_layers else "cpu",
            active=inst.leases,
            queued=inst.runner.queued,
            busy=inst.runner.generating,
            slots=inst.spec.n_parallel,
        )
