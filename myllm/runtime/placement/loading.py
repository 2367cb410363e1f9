"""Loading a model: one load per key however many requests wait for it, one load at a time, and
what happens when a load fails or a loaded runner ends on its own.

Concurrent requests for the same unloaded instance share its load. Loads run one at a time, so two
never plan with the same free memory. A load that fails for memory is retried: with half the GPU
layers while it has any (`LayerCaps`), else once after unloading everything idle. A runner that
crashes while loading, or too often while serving, puts its model in back-off (`CrashBackoff`). A
runner that dies takes only its instance: it is forgotten (its requests have already failed with
`ModelCrashed`) and the next request loads a fresh one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Generic, TypeVar

from myllm.errors import ModelCrashed, ModelLoadError, MyLLMError, OutOfMemory, TooManyReloads
from myllm.registry.schema import ModelRow
from myllm.registry.store import Registry
from myllm.runtime.engine_types import LoadSpec
from myllm.runtime.instance import PlacedRunner
from myllm.runtime.placement.crashes import CrashBackoff
from myllm.runtime.placement.instances import Instance, Instances
from myllm.runtime.placement.layer_caps import LayerCaps
from myllm.runtime.placement.memory import Footprint, MemoryEstimate, MiB, estimate, footprint
from myllm.runtime.placement.planner import Plan, worker_bytes
from myllm.runtime.placement.reloads import ReloadLimit
from myllm.runtime.placement.room import Room
from myllm.runtime.placement.rpc_workers import LostWorkers
from myllm.runtime.runner.protocol import RunnerConfig
from myllm.settings import Settings

log = logging.getLogger(__name__)
R = TypeVar("R", bound=PlacedRunner)
RunnerFactory = Callable[[RunnerConfig, int], Awaitable[R]]
"""(what to load, queue limit) -> a started runner: `ModelRunner.start`, or a unit test's fake."""


class Loader(Generic[R]):
    """Starts runners for load keys (see the module's docstring), and reacts to their ends."""

    def __init__(self, registry: Registry, settings: Settings, factory: RunnerFactory[R], room: Room[R],
                 keep_alive: float, kv_cache_bytes: int | None, reloads: ReloadLimit | None) -> None:
        self.registry = registry
        self.settings = settings
        self.factory = factory
        self.room = room
        self.instances: Instances[R] = room.instances
        self.keep_alive = keep_alive
        """A new instance's keep-alive (`MYLLM_KEEP_ALIVE`) until a request gives its own."""
        self.kv_cache_bytes = kv_cache_bytes
        """RAM for saved conversation KV states per model; None: as much as the model's context KV."""
        self.reloads = reloads
        """Costly loads per key (`MYLLM_RELOADS_PER_KEY`); None: unlimited."""
        self.crashes = CrashBackoff(settings.crash_limit, settings.crash_window)
        self.layer_caps = LayerCaps()
        self.lost_workers = LostWorkers()
        self.count = 0
        """Runners started."""
        self._cliffs: dict[tuple[Path, str], float] = {}
        """What runners measured of the CPU's attention paths, per model file and flash attention
        setting (the threads are the daemon's, the same for each): a reload passes it on rather
        than evaluating a few hundred tokens again to measure it (`measure_cliff`)."""
        self._loading: dict[LoadSpec, asyncio.Future[Instance[R]]] = {}
        self._lock = asyncio.Lock()

    async def load_shared(self, spec: LoadSpec, row: ModelRow, caller: str | None) -> Instance[R]:
        """The instance for `spec`, loaded by this call or by the one already loading it.
        `caller`: the key the load counts against (`MYLLM_RELOADS_PER_KEY`; None: not limited)."""
        pending = self._loading.get(spec)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except TooManyReloads:  # the key that started that load was over its limit, not this caller
                return self.instances.get(spec) or await self.load_shared(spec, row, caller)
        fut: asyncio.Future[Instance[R]] = asyncio.get_running_loop().create_future()
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

    async def _load(self, spec: LoadSpec, row: ModelRow, caller: str | None) -> Instance[R]:
        self.crashes.check(row)
        await self.registry.pools.blobs.run(self.registry.blob_file, row)  # the devices are known: `acquire` asked
        saved_kv = self.saved_kv_bytes(row, spec)
        fp = footprint(row, spec.n_ctx * spec.n_parallel, spec.embedding, saved_kv)
        whole = estimate(row, spec.n_ctx * spec.n_parallel, spec.embedding, saved_kv)
        # Layers asked of RPC workers go there, not to a local GPU: the runner fits them to the
        # workers' memory (`rpc_layer_bytes`), so this machine's plan has none on its GPU.
        wanted = 0 if spec.rpc_servers else self.layer_caps.wanted(spec, row)
        alone = self.room.alone(fp, wanted)
        if not alone.fits:
            raise self.room.too_large(spec, whole, alone)
        async with self._lock:
            if (inst := self.instances.get(spec)) is not None:
                return inst
            if caller is not None and self.reloads is not None and self.room.costs_others(spec, fp, wanted):
                self.reloads.take(caller, spec.name, time.monotonic())
            evicted_all = False
            while True:
                plan = await self.room.make(spec, fp, wanted)
                try:
                    return await self._create(spec, row, whole, fp, plan)
                except (OutOfMemory, ModelLoadError, ModelCrashed) as exc:
                    if plan.gpu_layers > 0:  # perhaps the GPU's memory: fewer layers, until none
                        wanted = self.layer_caps.fewer(row, plan.gpu_layers, exc.message)
                        continue
                    if isinstance(exc, OutOfMemory) and not evicted_all:
                        # The estimate said it fits but llama.cpp could not allocate: free what is idle, retry once.
                        evicted_all = True
                        if await self.room.evict_idle():
                            continue
                    if isinstance(exc, ModelCrashed):
                        self.crashes.record(row, exc, at_load=True)
                    raise

    async def _create(self, spec: LoadSpec, row: ModelRow, whole: MemoryEstimate, fp: Footprint,
                      plan: Plan[LoadSpec]) -> Instance[R]:
        loaded = dataclasses.replace(spec, n_gpu_layers=plan.gpu_layers, rpc_layer_bytes=worker_bytes(spec, fp))
        cliff_key = (spec.path, spec.flash_attention)
        config = RunnerConfig(loaded, self.settings.num_threads, self.saved_kv_bytes(row, spec), self.settings.runner_nice,
                              attention_cliff=self._cliffs.get(cliff_key))
        started = time.perf_counter()
        runner = await self.factory(config, self.settings.max_queue)
        if runner.attention_cliff is not None:
            self._cliffs[cliff_key] = runner.attention_cliff
        inst = Instance(spec, row, runner, whole, fp, plan.gpu_layers, plan.need, self.keep_alive)
        runner.on_exit = self._runner_exited
        runner.on_out_of_memory = self._out_of_memory
        self.instances.add(inst)
        self.count += 1
        self.instances.events.model_loaded(spec.name, time.perf_counter() - started)
        log.info(
            "loaded %s (ctx %d, %d/%d layers on the GPU) in runner %s: estimate %d MiB RAM + %d MiB GPU; measured: "
            "runner RSS %d MiB, GPU memory %d MiB",
            spec.name, spec.n_ctx, plan.gpu_layers, fp.max_gpu_layers, runner.pid,
            plan.need.ram // MiB, plan.need.vram // MiB, runner.rss() // MiB, runner.vram_used // MiB,
        )
        return inst

    def saved_kv_bytes(self, row: ModelRow, spec: LoadSpec) -> int:
        """The engine's RAM cache of conversation KV states (counted in the load estimate). By
        default as large as the context's own KV: a fixed size would hold dozens of conversations
        of a small model and not one of a 7B model's."""
        if spec.embedding:
            return 0
        if self.kv_cache_bytes is None:
            return estimate(row, spec.n_ctx * spec.n_parallel).kv_cache
        return self.kv_cache_bytes

    def _runner_exited(self, runner: PlacedRunner, error: MyLLMError) -> None:
        """A runner died on its own: forget its instance (its requests have failed already),
        so the next request loads a fresh one; with fewer layers on the GPU if it had any (a
        CUDA error such as running out of memory aborts the process)."""
        inst = self.instances.running(runner)
        if inst is not None:
            self.instances.forget(inst, "crash")
            log.warning("model %s is no longer loaded: %s", inst.spec.name, error.message)
            if isinstance(error, ModelCrashed):
                self.crashes.record(inst.row, error, at_load=False)
                self.lost_workers.lose(inst.spec.rpc_servers)  # llama.cpp aborts when a worker stops answering
            if inst.gpu_layers:
                self.layer_caps.fewer(inst.row, inst.gpu_layers, error.message)
        asyncio.get_running_loop().create_task(self.instances.notify())

    def _out_of_memory(self, runner: PlacedRunner, error: MyLLMError) -> None:
        """llama.cpp in a runner could not allocate while generating (its requests failed with
        `OutOfMemory`). With layers on the GPU the instance goes, and the model's next load
        has half of them; on the CPU alone the failed requests are all there is to it."""
        inst = self.instances.running(runner)
        if inst is None or not inst.gpu_layers:
            return
        self.layer_caps.fewer(inst.row, inst.gpu_layers, error.message)
        inst.runner.abort(error)
        asyncio.get_running_loop().create_task(self.instances.unload(inst, "out_of_memory"))
