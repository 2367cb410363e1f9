"""Which models are loaded: leases, two LRU memory budgets (RAM and GPU memory), keep-alive,
one load at a time.

Each loaded instance is a runner process (runtime/runner/), typed at this boundary as a
`PlacedRunner` (runtime/instance.py) so the manager's logic runs with a test's fake as well. The
manager answers the runtime's questions (a lease on a model, load, unload, what is loaded) and
composes one part per job, each beside it in placement/:
- instances.py: the table of loaded instances, and the one way one leaves;
- leases.py: leases and keep-alive (an instance with leases is never unloaded);
- loading.py: shared loading, its retries, and runners that end on their own;
- room.py: the planner's plan applied (layers on the GPU, evictions, waiting for busy ones);
- crashes.py: crash back-off; layer_caps.py: fewer GPU layers after running out of GPU memory;
- health.py: the watchdog that restarts stuck runners;
- gpu_budget.py: the GPUs found at start and their budget; report.py: what `ps` shows.
"""

from __future__ import annotations

import asyncio
import time
from typing import Generic, TypeVar, cast, overload

from myllm.errors import ModelNotLoaded, MyLLMError, ShuttingDown
from myllm.registry.schema import ModelRow
from myllm.registry.store import Registry
from myllm.runtime.devices import Devices, probe
from myllm.runtime.engine_types import LoadSpec
from myllm.runtime.hooks import RuntimeEvents
from myllm.runtime.instance import PlacedRunner, Runner, RunnerStats
from myllm.runtime.placement.gpu_budget import DeviceProbe, GpuBudget
from myllm.runtime.placement.health import HealthWatch, Incident
from myllm.runtime.placement.instances import Instances
from myllm.runtime.placement.leases import KeepAlive, Lease, Leases, requested
from myllm.runtime.placement.loading import Loader, RunnerFactory
from myllm.runtime.placement.memory import parse_memory
from myllm.runtime.placement.reloads import Rate, ReloadLimit
from myllm.runtime.placement.report import LoadedInfo, describe
from myllm.runtime.placement.room import Room
from myllm.runtime.request.durations import parse_duration
from myllm.runtime.runner import ModelRunner
from myllm.settings import Settings, rpc_endpoints

R = TypeVar("R", bound=PlacedRunner)
START_RUNNER: RunnerFactory[Runner] = ModelRunner.start
"""How the daemon starts a runner: a process of its own (runtime/runner/)."""



def load_name(row: ModelRow) -> str:
    """What a model's instances are loaded and listed as: its name, or for a model with LoRA
    adapters its blob's (`sha256-<12 hex>`), so that every adapter model over one GGUF shares one
    loaded base, each request applying its own adapters (engine/adapters.py)."""
    return f"sha256-{row.digest[:12]}" if row.adapters else row.name

class ModelManager(Generic[R]):
    """Holds the loaded instances of runners of type `R`: `Runner`s (`ModelRunner`s) in the
    daemon, a test's fakes in unit tests of its logic."""

    @overload
    def __init__(self: ModelManager[Runner], registry: Registry, settings: Settings, runner_factory: None = None,
                 budget: int | None = None, devices: DeviceProbe | None = None) -> None: ...

    @overload
    def __init__(self, registry: Registry, settings: Settings, runner_factory: RunnerFactory[R],
                 budget: int | None = None, devices: DeviceProbe | None = None) -> None: ...

    def __init__(self, registry: Registry, settings: Settings, runner_factory: RunnerFactory[R] | None = None,
                 budget: int | None = None, devices: DeviceProbe | None = None) -> None:
        """`runner_factory`: how a runner starts (`START_RUNNER` unless a test's fake);
        `budget`: the RAM budget (`MYLLM_MAX_MEMORY` unless given); `devices`: how the GPUs are
        found (`devices.probe` unless a test's fake device)."""
        self.registry = registry
        self.settings = settings
        ram = budget if budget is not None else parse_memory(settings.max_memory)
        keep_alive = parse_duration(settings.keep_alive)
        load_timeout = parse_duration(settings.load_timeout, "load_timeout")
        kv_cache = None if settings.kv_cache.strip().lower() == "auto" else parse_memory(settings.kv_cache)
        rate = (settings.reloads_per_key or "").strip()
        reloads = ReloadLimit(Rate.parse(rate, "reloads_per_key")) if rate else None
        factory = runner_factory or cast("RunnerFactory[R]", START_RUNNER)  # R is Runner then (the first overload)
        self.gpus = GpuBudget(devices or probe, settings.max_gpu_memory)
        self._instances: Instances[R] = Instances()
        self.room = Room(self._instances, self.gpus, ram, load_timeout, settings.max_loaded_models)
        self.loader = Loader(registry, settings, factory, self.room, keep_alive, kv_cache, reloads)
        self.leases = Leases(self._instances)
        self.health = HealthWatch(settings.health_interval)
        self._tasks: list[asyncio.Task[None]] = []
        """The background tasks: keep-alive and the health watchdog."""
        self._closing = False

    # -- figures read and set from outside ---------------------------------------------------------

    @property
    def budget(self) -> int:
        """The RAM budget."""
        return self.room.budget

    @property
    def vram_budget(self) -> int:
        """The GPU memory budget (0 without a GPU), set once the GPUs are known."""
        return self.gpus.vram_budget

    @property
    def load_timeout(self) -> float:
        """Seconds a load waits for busy instances to free the memory it needs."""
        return self.room.load_timeout

    @load_timeout.setter
    def load_timeout(self, seconds: float) -> None:
        self.room.load_timeout = seconds

    @property
    def events(self) -> RuntimeEvents:
        """Told of loads, unloads and finished generations (the daemon puts its metrics here)."""
        return self._instances.events

    @events.setter
    def events(self, events: RuntimeEvents) -> None:
        self._instances.events = events

    @property
    def load_count(self) -> int:
        """Runners started since the manager was made."""
        return self.loader.count

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the background tasks: unloading expired idle instances, checking runners; and
        ask which GPUs there are (their free memory now sets the default GPU budget)."""
        self.gpus.start()
        if not self._tasks:
            self._tasks = [asyncio.create_task(self.leases.reap_forever(), name="myllm-keepalive"),
                           asyncio.create_task(self.health.watch(self._instances.values), name="myllm-health")]

    async def close(self) -> None:
        """Stop everything: running requests end with `ShuttingDown`, then every runner exits."""
        self._closing = True
        self.abort_all(ShuttingDown("the server is shutting down"))
        for task in self._tasks:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self.gpus.close()
        await asyncio.gather(*(self._instances.unload(inst) for inst in self._instances.values()))

    def abort_all(self, error: MyLLMError) -> None:
        """Stop every running and queued request now; their streams raise `error`."""
        for inst in self._instances.values():
            inst.runner.abort(error)

    async def devices(self) -> Devices:
        """The GPUs llama.cpp can use, asked once (at start, or at the first load)."""
        return await self.gpus.devices()

    def used(self) -> int:
        """RAM charged to loaded instances."""
        return self._instances.used()

    def vram_used(self) -> int:
        """GPU memory charged to loaded instances."""
        return self._instances.vram_used()

    def gpu_memory_used(self) -> int:
        """GPU memory in use: what was not free when the daemon asked at start (other programs,
        the desktop), plus what its loaded models hold."""
        return self.gpus.memory_used(self.vram_used())

    async def reap(self) -> list[str]:
        """Unload the idle instances whose keep-alive has run out; their names."""
        return await self.leases.reap()

    async def check_health(self) -> list[Incident]:
        """Check every runner now; restart the stuck ones (see health.py)."""
        return await self.health.check(self._instances.values())

    def problems(self) -> list[str]:
        """What readiness reports: restarts after a failed health check, for a minute."""
        return self.health.problems()

    # -- leases --------------------------------------------------------------------

    def spec_for(
        self, row: ModelRow, num_ctx: int | None = None, embedding: bool = False, num_gpu: int | None = None
    ) -> LoadSpec:
        """The load key. Its `n_gpu_layers` is what is asked for (the request's `num_gpu`, else
        the model's, else `MYLLM_NUM_GPU`; -1: as many as fit), not what the planner gives, so
        requests asking alike share an instance whatever fitted when it loaded. Only values that
        change the load make another key: without a GPU (once the devices are known) every
        `num_gpu` is 0 (unless RPC workers take the layers), one of at least the model's
        offloadable layers is -1 (all of them, as fit), and the context is rounded to
        `context_size`'s steps (in `LoadSpec.for_model`)."""
        params = row.parameters or {}
        wanted = num_ctx or int(params.get("num_ctx") or self.settings.num_ctx)
        layers = num_gpu if num_gpu is not None else params.get("num_gpu")
        layers = int(layers if layers is not None else self.settings.num_gpu)
        offloadable = int((row.details or {}).get("block_count") or 0) + 1
        servers = self.loader.lost_workers.usable(rpc_endpoints(str(params.get("rpc_servers") or self.settings.rpc_servers)))
        if self.gpus.known and not self.gpus.gpu.available and not servers:
            layers = 0
        elif layers < 0 or (offloadable > 1 and layers >= offloadable):
            layers = -1
        return LoadSpec.for_model(row, self.registry.blobs.path(row.digest), wanted, layers,
                                  embedding=embedding, name=load_name(row),
                                  n_parallel=self.settings.num_parallel,
                                  flash_attention=self.settings.flash_attention,
                                  projector=self.registry.projector_file(row), draft_max=self.settings.draft_max,
                                  rpc_servers=servers, draft=self.registry.draft_file(row),
                                  grammar_seconds=self.settings.grammar_token_ms / 1000,
                                  stream_interval=self.settings.stream_interval_ms / 1000)

    async def acquire(
        self,
        model: str | ModelRow,
        keep_alive: KeepAlive = None,
        num_ctx: int | None = None,
        embedding: bool = False,
        num_gpu: int | None = None,
        caller: str | None = None,
    ) -> Lease[R]:
        """A lease on a loaded instance of `model` (a name, or the row a caller has already
        looked up), loading it first if needed. Concurrent acquires of the same unloaded model
        share one load. `caller`: the key whose loads count against `MYLLM_RELOADS_PER_KEY`
        (None: not limited)."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        seconds, extend_only = requested(keep_alive)
        row = model if isinstance(model, ModelRow) else await self.registry.lookup(model)
        await self.devices()  # whether there is a GPU decides what the load key holds
        await self.loader.lost_workers.recheck()  # RPC workers that went away and may be back
        spec = self.spec_for(row, num_ctx, embedding, num_gpu)
        inst = self._instances.get(spec)
        if inst is None:
            inst = await self.loader.load_shared(spec, row, caller)
        return self.leases.take(inst, seconds, extend_only, self.gpus.device_of(inst.gpu_layers))

    # -- explicit control ------------------------------------------------------------

    async def load(self, name: str, keep_alive: KeepAlive = None, caller: str | None = None) -> LoadedInfo:
        lease = await self.acquire(name, keep_alive=keep_alive, caller=caller)
        info = describe(lease.instance, lease.device)
        lease.release()
        return info

    async def unload(self, name: str, abort: bool = False) -> int:
        """Unload every instance of `name`. Idle ones go now; busy ones as soon as their
        requests finish, or at once with `abort`, their requests failing with
        `ModelNotLoaded`. Returns how many instances were affected."""
        row = await self.registry.lookup(name)
        hits = self._instances.of_model(load_name(row))
        for inst in hits:
            inst.keep_alive = 0
            if abort and not inst.idle:
                inst.runner.abort(ModelNotLoaded(f"model '{row.name}' was unloaded while this request ran"))
                await self._instances.unload(inst)
            elif inst.idle:
                await self._instances.unload(inst)
            else:
                inst.expires_at = time.monotonic()
        return len(hits)

    def is_loaded(self, name: str) -> bool:
        return bool(self._instances.of_model(name))

    async def runner_stats(self, name: str) -> RunnerStats:
        """The figures `name`'s runners report about themselves, each summed over the model's
        instances as `per_model` sums theirs (all are counts and bytes)."""
        runners = [i.runner for i in self._instances.of_model(name)]
        if not runners:
            raise ModelNotLoaded(f"model '{name}' is not loaded")
        total: RunnerStats = {}
        for figures in await asyncio.wait_for(asyncio.gather(*(r.stats() for r in runners)), timeout=5):
            for key, value in figures.items():
                total[key] = total.get(key, 0) + value
        return total

    def loaded(self) -> list[LoadedInfo]:
        instances = sorted(self._instances.values(), key=lambda i: i.spec.name)
        return [describe(i, self.gpus.device_of(i.gpu_layers)) for i in instances]
