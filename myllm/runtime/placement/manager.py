"""Which models are loaded: leases, two LRU memory budgets (RAM and GPU memory), keep-alive,
one load at a time.

Each loaded instance is a runner process (runtime/runner/). A request takes a *lease* on a
loaded instance (loading it if needed) and returns it when done. An instance with leases is never unloaded; its keep-alive timer starts when the last
lease is returned. Before a load the planner (runtime/placement/planner.py) decides how many of the
model's layers go to the GPU (as many as fit, at most what `num_gpu` allows) and which idle
instances must leave for it, least recently used first, in whichever budget is short; if busy
ones hold the memory the load waits (up to the load timeout) for them to finish. Memory is
counted per instance as the larger of its estimate and what was measured: its runner's RSS,
and the GPU memory its load took.

A runner that dies takes only its instance: the manager forgets it (its requests have already
failed with `ModelCrashed`) and the next request loads a fresh one. A model whose runner crashes
again and again (`MYLLM_CRASH_LIMIT` times within `MYLLM_CRASH_WINDOW`, while serving: a file
whose hyperparameters abort llama.cpp on every request), or once while loading, is refused for a
while (30 s, doubling up to 10 min) instead of crash-looping, loading nothing and evicting
nothing. With
layers on the GPU, a load that fails or crashes, a runner that crashes, or one that reports
llama.cpp out of memory while generating is retried with half the layers (for the next 10 min).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from myllm.errors import (
    ModelCrashed,
    ModelLoadError,
    ModelNotLoaded,
    MyLLMError,
    OutOfMemory,
    ShuttingDown,
    TooManyReloads,
)
from myllm.registry.schema import ModelRow
from myllm.registry.store import Registry
from myllm.runtime.engine_types import LoadSpec
from myllm.runtime.hooks import RuntimeEvents
from myllm.runtime.placement.devices import NO_GPU, Devices, probe
from myllm.runtime.placement.memory import (
    Footprint,
    MemoryEstimate,
    MiB,
    Split,
    estimate,
    footprint,
    movable,
    parse_memory,
    processor,
)
from myllm.runtime.placement.planner import Budgets, Plan, Resident, plan_load
from myllm.runtime.placement.reloads import Rate, ReloadLimit
from myllm.runtime.request.durations import parse_duration
from myllm.runtime.runner import ModelRunner
from myllm.runtime.runner.protocol import RunnerConfig
from myllm.settings import Settings

log = logging.getLogger(__name__)
RunnerFactory = Callable[[RunnerConfig, int], Awaitable[Any]]
"""(what to load, queue limit) -> a started runner: `ModelRunner.start`, or a unit test's fake."""
DeviceProbe = Callable[[], Awaitable[Devices]]
"""-> the GPUs llama.cpp can use: `devices.probe`, or a unit test's fake device."""
GPU_RETRY_MEMORY = 600.0
"""How long a model keeps the smaller layer count it was retried with after running out of GPU
memory (another program may have held that memory for a while)."""
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


@dataclass(frozen=True)
class ExtendOnly:
    """A keep-alive that may lengthen how long a model stays loaded but never shorten it: an
    inference key's, since the model is shared (its `keep_alive: 0` would unload it under other
    users' requests). Ollama's clients send `keep_alive` routinely, so it is ignored, not refused."""

    value: str | float


KeepAlive = str | float | ExtendOnly | None
"""A request's keep-alive: a duration (see `parse_duration`), one that may only lengthen, or None."""


def outlasts(new: float, current: float) -> bool:
    """Whether keep-alive `new` keeps a model loaded longer than `current` (negative: for good)."""
    return current >= 0 and (new < 0 or new > current)


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


@dataclass
class Instance:
    spec: LoadSpec
    """The load key: `n_gpu_layers` is what was asked for (-1: as many as fit)."""
    row: ModelRow
    runner: Any
    """A `ModelRunner` (a test's fake in unit tests of the manager's logic)."""
    estimate: MemoryEstimate
    footprint: Footprint
    """Its memory by part, as the planner split it."""
    gpu_layers: int
    """Layers llama.cpp put on the GPU (the planner's choice)."""
    split: Split
    """`footprint` split between RAM and GPU memory for those layers."""
    keep_alive: float
    leases: int = 0
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float | None = None
    """Monotonic deadline while idle; None while leased or kept forever."""

    @property
    def idle(self) -> bool:
        return self.leases == 0 and not self.runner.busy

    @property
    def charged(self) -> Split:
        """What counts against the budgets: the estimate, or what was measured if larger (the
        runner's RSS now; the GPU memory its load took)."""
        return Split(max(self.split.ram, self.runner.rss()), max(self.split.vram, self.runner.vram_used))


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
    """Where the model computes: "cpu", or the GPU's kind ("cuda", "mps") when layers are there."""
    gpu_layers: int
    """Layers on the GPU, of `layers`."""
    layers: int
    """The model's offloadable layers (its repeating layers and the output layer)."""
    size_vram: int
    """The estimate's GPU share (of `size_estimate`)."""
    offload: Split
    """What offloading moves (`memory.movable`) and where it is: `processor` is its share."""
    vram_used: int
    """GPU memory measured: the device's free memory before the load less after it."""
    active: int
    queued: int
    busy: int
    """Sequences generating now, of `slots`."""
    slots: int

    @property
    def rss_growth(self) -> int:
        return self.rss_after - self.rss_before

    @property
    def processor(self) -> str:
        """Ollama's PROCESSOR column: "100% CPU", "100% GPU", "48%/52% CPU/GPU" (`memory.processor`)."""
        return processor(self.offload)


def per_model(loaded: list[LoadedInfo]) -> list[LoadedInfo]:
    """`loaded` (instances) as one row per model name, in their order, as Ollama's `ps` lists
    models. A model loaded more than once (its chat and embedding instances, or two context
    sizes or `num_gpu`s) is one row that adds up what its instances hold and do side by side:
    memory (`size_estimate`, `size_vram`, `vram_used`, RSS before, after and now), layers
    (`gpu_layers` of `layers`), bytes offloading moved (so `processor` is their share over
    all of them), and work (`active`, `queued`, `busy` of `slots`). `context_length` is the
    largest; `expires_at` the latest, since the model leaves memory with its last instance
    (None, kept for good, outlasts any date); `device` a GPU's when any instance uses one;
    `embedding` only when every instance is one; `pid` None, as no one process runs them all."""
    groups: dict[str, list[LoadedInfo]] = {}
    for info in loaded:
        groups.setdefault(info.name, []).append(info)
    return [infos[0] if len(infos) == 1 else _combined(infos) for infos in groups.values()]


def _combined(infos: list[LoadedInfo]) -> LoadedInfo:
    expiries = [i.expires_at for i in infos]
    gpu = next((i.device for i in infos if i.device != "cpu"), "cpu")
    return LoadedInfo(
        name=infos[0].name,
        digest=infos[0].digest,
        context_length=max(i.context_length for i in infos),
        embedding=all(i.embedding for i in infos),
        size_estimate=sum(i.size_estimate for i in infos),
        rss_before=sum(i.rss_before for i in infos),
        rss_after=sum(i.rss_after for i in infos),
        rss=sum(i.rss for i in infos),
        pid=None,
        expires_at=None if None in expiries else max(e for e in expiries if e is not None),
        device=gpu,
        gpu_layers=sum(i.gpu_layers for i in infos),
        layers=sum(i.layers for i in infos),
        size_vram=sum(i.size_vram for i in infos),
        offload=Split(sum(i.offload.ram for i in infos), sum(i.offload.vram for i in infos)),
        vram_used=sum(i.vram_used for i in infos),
        active=sum(i.active for i in infos),
        queued=sum(i.queued for i in infos),
        busy=sum(i.busy for i in infos),
        slots=sum(i.slots for i in infos),
    )


class Lease:
    """The right to use one loaded instance for one request. Release exactly once."""

    def __init__(self, manager: ModelManager, instance: Instance, keep_alive: float | None,
                 extend_only: bool = False) -> None:
        self._manager = manager
        self.instance = instance
        self.keep_alive = keep_alive
        self.extend_only = extend_only
        self._released = False

    @property
    def runner(self) -> Any:
        return self.instance.runner

    @property
    def row(self) -> ModelRow:
        return self.instance.row

    @property
    def device(self) -> str:
        """Where the model computes: "cpu", or the GPU's kind ("cuda") when layers are there."""
        return self._manager.gpu.kind if self.instance.gpu_layers else "cpu"

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._manager._release(self.instance, self.keep_alive, self.extend_only)


class ModelManager:
    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        runner_factory: RunnerFactory | None = None,
        budget: int | None = None,
        devices: DeviceProbe | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.budget = budget if budget is not None else parse_memory(settings.max_memory)
        """The RAM budget."""
        self._probe: DeviceProbe = devices or probe
        self._devices: asyncio.Task[Devices] | None = None
        self.gpu: Devices = NO_GPU
        """The GPUs llama.cpp can use, as found at start (`devices()`)."""
        self.vram_budget = 0
        """The GPU memory budget (0 without a GPU), set once the GPUs are known."""
        self._layer_caps: dict[str, tuple[int, float]] = {}
        """Models retried with fewer layers after running out of GPU memory: digest -> (layers, until)."""
        self.default_keep_alive = parse_duration(settings.keep_alive)
        self.load_timeout = parse_duration(settings.load_timeout, "load_timeout")
        self.kv_cache_bytes = None if settings.kv_cache.strip().lower() == "auto" else parse_memory(settings.kv_cache)
        """RAM for saved conversation KV states per model; None: as much as the model's context KV."""
        self._factory: RunnerFactory = runner_factory or ModelRunner.start
        rate = (settings.reloads_per_key or "").strip()
        self.reloads = ReloadLimit(Rate.parse(rate, "reloads_per_key")) if rate else None
        """Costly loads per key (`MYLLM_RELOADS_PER_KEY`); None: unlimited."""
        self._crashes: dict[str, Crashes] = {}
        """Runner crashes by model digest (the file crashed llama.cpp, whatever its name)."""
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
        """Start the background tasks: unloading expired idle instances, checking runners; and
        ask which GPUs there are (their free memory now sets the default GPU budget)."""
        self._devices_task()
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever(), name="myllm-keepalive")
            self._checker = asyncio.create_task(self._check_forever(), name="myllm-health")

    async def close(self) -> None:
        """Stop everything: running requests end with `ShuttingDown`, then every runner exits."""
        self._closing = True
        self.abort_all(ShuttingDown("the server is shutting down"))
        for task in (self._reaper, self._checker, self._devices):
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

    def _devices_task(self) -> asyncio.Task[Devices]:
        if self._devices is None:
            self._devices = asyncio.create_task(self._find_devices(), name="myllm-devices")
        return self._devices

    async def _find_devices(self) -> Devices:
        found = await self._probe()
        self.gpu = found
        if found.available:
            self.vram_budget = parse_memory(self.settings.max_gpu_memory, available=found.free)
            log.info("GPU: %s, %d MiB free of %d MiB; GPU memory budget %d MiB", found.name, found.free // MiB,
                     found.total // MiB, self.vram_budget // MiB)
        return found

    async def devices(self) -> Devices:
        """The GPUs llama.cpp can use, asked once (at start, or at the first load)."""
        return await asyncio.shield(self._devices_task())

    def vram_used(self) -> int:
        """GPU memory charged to loaded instances."""
        return sum(i.charged.vram for i in self._instances.values())

    def gpu_memory_used(self) -> int:
        """GPU memory in use: what was not free when the daemon asked at start (other programs,
        the desktop), plus what its loaded models hold."""
        return self.gpu.total - self.gpu.free + self.vram_used() if self.gpu.available else 0

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

    def spec_for(
        self, row: ModelRow, num_ctx: int | None = None, embedding: bool = False, num_gpu: int | None = None
    ) -> LoadSpec:
        """The load key. Its `n_gpu_layers` is what is asked for (the request's `num_gpu`, else
        the model's, else `MYLLM_NUM_GPU`; -1: as many as fit), not what the planner gives, so
        requests asking alike share an instance whatever fitted when it loaded. Only values that
        change the load make another key: without a GPU (once the devices are known) every
        `num_gpu` is 0, one of at least the model's offloadable layers is -1 (all of them, as
        fit), and the context is rounded to `context_size`'s steps (in `LoadSpec.for_model`)."""
        params = row.parameters or {}
        wanted = num_ctx or int(params.get("num_ctx") or self.settings.num_ctx)
        layers = num_gpu if num_gpu is not None else params.get("num_gpu")
        layers = int(layers if layers is not None else self.settings.num_gpu)
        offloadable = int((row.details or {}).get("block_count") or 0) + 1
        if self._devices is not None and self._devices.done() and not self.gpu.available:
            layers = 0
        elif layers < 0 or (offloadable > 1 and layers >= offloadable):
            layers = -1
        return LoadSpec.for_model(row, self.registry.blobs.path(row.digest), wanted, layers,
                                  embedding=embedding,
                                  n_parallel=self.settings.num_parallel)

    async def acquire(
        self,
        model: str | ModelRow,
        keep_alive: KeepAlive = None,
        num_ctx: int | None = None,
        embedding: bool = False,
        num_gpu: int | None = None,
        caller: str | None = None,
    ) -> Lease:
        """A lease on a loaded instance of `model` (a name, or the row a caller has already
        looked up), loading it first if needed. Concurrent acquires of the same unloaded model
        share one load. `caller`: the key whose loads count against `MYLLM_RELOADS_PER_KEY`
        (None: not limited)."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        extend_only = isinstance(keep_alive, ExtendOnly)
        given = keep_alive.value if isinstance(keep_alive, ExtendOnly) else keep_alive
        ka = None if given is None else parse_duration(given)
        row = model if isinstance(model, ModelRow) else await self.registry.pools.db.run(self.registry.get, model)
        await self.devices()  # whether there is a GPU decides what the load key holds
        spec = self.spec_for(row, num_ctx, embedding, num_gpu)
        inst = self._instances.get(spec)
        if inst is None:
            inst = await self._load_shared(spec, row, caller)
        inst.leases += 1
        inst.expires_at = None
        inst.last_used = time.monotonic()
        return Lease(self, inst, ka, extend_only)

    def _release(self, inst: Instance, keep_alive: float | None, extend_only: bool = False) -> None:
        inst.leases -= 1
        inst.last_used = time.monotonic()
        if self._instances.get(inst.spec) is not inst:  # unloaded, or its runner died
            return
        if keep_alive is not None and (not extend_only or outlasts(keep_alive, inst.keep_alive)):
            inst.keep_alive = keep_alive
        if inst.leases == 0:
            inst.expires_at = None if inst.keep_alive < 0 else inst.last_used + inst.keep_alive
        asyncio.get_running_loop().create_task(self._after_release(inst))

    async def _after_release(self, inst: Instance) -> None:
        if inst.keep_alive == 0 and inst.leases == 0:
            await self.reap()
        await self._notify()

    # -- loading -------------------------------------------------------------------

    async def _load_shared(self, spec: LoadSpec, row: ModelRow, caller: str | None) -> Instance:
        pending = self._loading.get(spec)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except TooManyReloads:  # the key that started that load was over its limit, not this caller
                return self._instances.get(spec) or await self._load_shared(spec, row, caller)
        fut: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
        self._loading[spec] = fut
        try:
            inst = await self._load(spec, row, caller)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved here; waiters re-raise it themselves
            raise
        finally:
            del self._loading[spec]
        fut.set_result(inst)
        return inst

    def used(self) -> int:
        """RAM charged to loaded instances."""
        return sum(i.charged.ram for i in self._instances.values())

    async def _load(self, spec: LoadSpec, row: ModelRow, caller: str | None = None) -> Instance:
        self._check_crashes(row)
        await self.registry.pools.blobs.run(self.registry.blob_file, row)  # the devices are known: `acquire` asked
        saved_kv = self._saved_kv_bytes(row, spec)
        fp = footprint(row, spec.n_ctx * spec.n_parallel, spec.embedding, saved_kv)
        whole = estimate(row, spec.n_ctx * spec.n_parallel, spec.embedding, saved_kv)
        wanted = self._wanted_layers(spec, row)
        alone = plan_load(fp, wanted, self._budgets(), [])
        if not alone.fits:
            raise self._too_large(spec, whole, alone)
        async with self._load_lock:
            if (inst := self._instances.get(spec)) is not None:
                return inst
            if caller is not None and self.reloads is not None and self._costs_others(spec, fp, wanted):
                self.reloads.take(caller, spec.name, time.monotonic())
            evicted_all = False
            while True:
                plan = await self._make_room(spec, fp, wanted)
                try:
                    return await self._create(spec, row, whole, fp, plan)
                except (OutOfMemory, ModelLoadError, ModelCrashed) as exc:
                    if plan.gpu_layers > 0:  # perhaps the GPU's memory: fewer layers, until none
                        wanted = self._fewer_layers(row, plan.gpu_layers, exc.message)
                        continue
                    if isinstance(exc, OutOfMemory) and not evicted_all:
                        # The estimate said it fits but llama.cpp could not allocate: free what is idle, retry once.
                        evicted_all = True
                        if await self._evict_idle():
                            continue
                    if isinstance(exc, ModelCrashed):
                        self._record_crash(row, exc, at_load=True)
                    raise

    def _costs_others(self, spec: LoadSpec, fp: Footprint, wanted: int) -> bool:
        """Whether loading `spec` now would evict an instance (or wait for a busy one's room), or
        add a second instance of a model already loaded with other options."""
        plan = plan_load(fp, wanted, self._budgets(), self._residents())
        return bool(plan.evict) or not plan.fits or any(i.spec.name == spec.name for i in self._instances.values())

    def _too_large(self, spec: LoadSpec, whole: MemoryEstimate, plan: Plan[LoadSpec]) -> OutOfMemory:
        need = plan.need.ram
        if plan.gpu_layers:
            parts = f"of RAM with {plan.gpu_layers} layers on the GPU"
        else:
            parts = (f"(runner {whole.process // MiB}, weights {whole.weights // MiB}, KV cache {whole.kv_cache // MiB}, "
                     f"compute {whole.compute // MiB})")
        return OutOfMemory(
            f"model '{spec.name}' needs about {need // MiB} MiB {parts} with {spec.n_parallel} x {spec.n_ctx}-token "
            f"context, more than the whole memory budget of {self.budget // MiB} MiB",
            needed=need,
            budget=self.budget,
        )

    def _check_crashes(self, row: ModelRow) -> None:
        """Refuse a model in its crash back-off, saying why and until when (`Retry-After`)."""
        crashes = self._crashes.get(row.digest)
        now = time.monotonic()
        if crashes is None or now >= crashes.until or crashes.error is None:
            return
        left = math.ceil(crashes.until - now)
        until = (datetime.now(timezone.utc) + timedelta(seconds=left)).strftime("%H:%M:%S UTC")
        if crashes.at_load:
            why = f"crashed its runner while loading {now - crashes.times[-1]:.0f}s ago"
        else:
            why = (f"crashed its runner {len(crashes.times)} times in the last {now - crashes.times[0]:.0f}s "
                   f"(MYLLM_CRASH_LIMIT is {self.settings.crash_limit})")
        raise ModelCrashed(f"model '{row.name}' {why} ({crashes.error.message}); not trying again for {left}s "
                           f"(until {until})", retry_after=left)

    def _record_crash(self, row: ModelRow, exc: ModelCrashed, at_load: bool) -> None:
        """Count a crash of `row`'s runner; a crash while loading, or the `crash_limit`th within
        the window, starts a back-off twice as long as the last one (the model was not quiet
        for a whole window since)."""
        now = time.monotonic()
        crashes = self._crashes.setdefault(row.digest, Crashes())
        window = self.settings.crash_window
        while crashes.times and crashes.times[0] <= now - window:
            crashes.times.popleft()
        if not crashes.times and crashes.until <= now - window:
            crashes.backoffs = 0
        crashes.times.append(now)
        crashes.error, crashes.at_load = exc, at_load
        if at_load or len(crashes.times) >= self.settings.crash_limit:
            crashes.backoffs += 1
            crashes.until = now + min(CRASH_BACKOFF * 2 ** (crashes.backoffs - 1), CRASH_BACKOFF_MAX)
            log.error("%s; model %s refused for %.0fs", exc.message, row.name, crashes.until - now)
        else:
            log.error("%s", exc.message)

    def _wanted_layers(self, spec: LoadSpec, row: ModelRow) -> int:
        """The most layers this load may put on the GPU: what the spec asks for, unless the model
        ran out of GPU memory lately with more."""
        cap = self._layer_caps.get(row.digest)
        if cap is None or cap[1] <= time.monotonic():
            return spec.n_gpu_layers
        return cap[0] if spec.n_gpu_layers < 0 else min(spec.n_gpu_layers, cap[0])

    def _fewer_layers(self, row: ModelRow, layers: int, why: str) -> int:
        """Half of `layers` (the next try's most), remembered for `GPU_RETRY_MEMORY` seconds."""
        fewer = layers // 2
        self._layer_caps[row.digest] = (fewer, time.monotonic() + GPU_RETRY_MEMORY)
        log.warning("model %s with %d layers on the GPU: %s; trying again with %d", row.name, layers, why, fewer)
        return fewer

    async def _create(self, spec: LoadSpec, row: ModelRow, whole: MemoryEstimate, fp: Footprint, plan: Plan[LoadSpec]) -> Instance:
        loaded = dataclasses.replace(spec, n_gpu_layers=plan.gpu_layers)
        config = RunnerConfig(loaded, self.settings.num_threads, self._saved_kv_bytes(row, spec))
        started = time.perf_counter()
        runner = await self._factory(config, self.settings.max_queue)
        inst = Instance(spec, row, runner, whole, fp, plan.gpu_layers, plan.need, self.default_keep_alive)
        runner.on_exit = self._runner_exited
        runner.on_out_of_memory = self._out_of_memory
        self._instances[spec] = inst
        self.load_count += 1
        self.events.model_loaded(spec.name, time.perf_counter() - started)
        log.info(
            "loaded %s (ctx %d, %d/%d layers on the GPU) in runner %s: estimate %d MiB RAM + %d MiB GPU; measured: "
            "runner RSS %d MiB, GPU memory %d MiB",
            spec.name, spec.n_ctx, plan.gpu_layers, fp.max_gpu_layers, getattr(runner, "pid", None),
            plan.need.ram // MiB, plan.need.vram // MiB, runner.rss() // MiB, runner.vram_used // MiB,
        )
        return inst

    def _runner_exited(self, runner: Any, error: MyLLMError) -> None:
        """A runner died on its own: forget its instance (its requests have failed already),
        so the next request loads a fresh one; with fewer layers on the GPU if it had any (a
        CUDA error such as running out of memory aborts the process)."""
        for spec, inst in list(self._instances.items()):
            if inst.runner is runner:
                del self._instances[spec]
                log.warning("model %s is no longer loaded: %s", spec.name, error.message)
                self.events.model_unloaded(spec.name, "crash")
                if isinstance(error, ModelCrashed):
                    self._record_crash(inst.row, error, at_load=False)
                if inst.gpu_layers:
                    self._fewer_layers(inst.row, inst.gpu_layers, error.message)
        asyncio.get_running_loop().create_task(self._notify())

    def _out_of_memory(self, runner: Any, error: MyLLMError) -> None:
        """llama.cpp in a runner could not allocate while generating (its requests failed with
        `OutOfMemory`). With layers on the GPU the instance goes, and the model's next load
        has half of them; on the CPU alone the failed requests are all there is to it."""
        inst = next((i for i in self._instances.values() if i.runner is runner), None)
        if inst is None or not inst.gpu_layers:
            return
        self._fewer_layers(inst.row, inst.gpu_layers, error.message)
        inst.runner.abort(error)
        asyncio.get_running_loop().create_task(self._unload(inst, "out_of_memory"))

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

    def _budgets(self) -> Budgets:
        return Budgets(self.budget, self.vram_budget if self.gpu.available else 0, self.settings.max_loaded_models)

    def _residents(self) -> list[Resident[LoadSpec]]:
        return [Resident(spec, inst.charged, inst.idle, inst.last_used) for spec, inst in self._instances.items()]

    async def _evict_idle(self) -> bool:
        """Unload every idle instance; returns whether there was one."""
        victims = [i for i in self._instances.values() if i.idle]
        for inst in victims:
            await self._unload(inst, "lru")
        return bool(victims)

    async def _make_room(self, spec: LoadSpec, fp: Footprint, wanted: int) -> Plan[LoadSpec]:
        """The plan for loading `fp` now, after unloading the idle instances it names; while busy
        instances hold what is missing, wait (up to the load timeout) for them to finish."""
        deadline = time.monotonic() + self.load_timeout
        while True:
            plan = plan_load(fp, wanted, self._budgets(), self._residents())
            victims = [inst for key in plan.evict if (inst := self._instances.get(key)) is not None and inst.idle]
            for inst in victims:
                await self._unload(inst, "lru")
            if victims:
                continue  # measured again after the unloads
            if plan.fits:
                return plan
            left = deadline - time.monotonic()
            if left <= 0:
                busy = ", ".join(sorted(i.spec.name for i in self._instances.values()))
                gpu = f" and {plan.need.vram // MiB} MiB of GPU memory" if plan.need.vram else ""
                raise OutOfMemory(
                    f"model '{spec.name}' needs about {plan.need.ram // MiB} MiB{gpu} but only "
                    f"{max(0, self.budget - self.used()) // MiB} MiB of the {self.budget // MiB} MiB budget"
                    + (f" and {max(0, self.vram_budget - self.vram_used()) // MiB} MiB of the {self.vram_budget // MiB} "
                       f"MiB GPU budget" if plan.need.vram else "")
                    + f" are free and the loaded models are busy ({busy}); waited {self.load_timeout:.0f}s",
                    needed=plan.need.ram,
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

    async def load(self, name: str, keep_alive: KeepAlive = None, caller: str | None = None) -> LoadedInfo:
        lease = await self.acquire(name, keep_alive=keep_alive, caller=caller)
        info = self._info(lease.instance)
        lease.release()
        return info

    async def unload(self, name: str, abort: bool = False) -> int:
        """Unload every instance of `name`. Idle ones go now; busy ones as soon as their
        requests finish, or at once with `abort`, their requests failing with
        `ModelNotLoaded`. Returns how many instances were affected."""
        row = await self.registry.pools.db.run(self.registry.get, name)
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
        """The figures `name`'s runners report about themselves, each summed over the model's
        instances as `per_model` sums theirs (all are counts and bytes)."""
        runners = [i.runner for i in self._instances.values() if i.spec.name == name]
        if not runners:
            raise ModelNotLoaded(f"model '{name}' is not loaded")
        total: dict[str, Any] = {}
        for figures in await asyncio.wait_for(asyncio.gather(*(r.stats() for r in runners)), timeout=5):
            for key, value in figures.items():
                total[key] = total.get(key, 0) + value
        return total

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
            size_estimate=inst.split.total,
            rss_before=inst.runner.rss_before,
            rss_after=inst.runner.rss_after,
            rss=inst.runner.rss(),
            pid=getattr(inst.runner, "pid", None),
            expires_at=expires,
            device=self.gpu.kind if inst.gpu_layers else "cpu",
            gpu_layers=inst.gpu_layers,
            layers=inst.footprint.max_gpu_layers,
            size_vram=inst.split.vram,
            offload=movable(inst.footprint, inst.gpu_layers),
            vram_used=inst.runner.vram_used,
            active=inst.leases,
            queued=inst.runner.queued,
            busy=inst.runner.generating,
            slots=inst.spec.n_parallel,
        )
