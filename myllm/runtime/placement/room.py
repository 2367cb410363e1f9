"""Making room for a load: the planner's decision applied to what is loaded now.

The planner (planner.py) is pure arithmetic over numbers; this is its loop over the live table.
Before a load the plan names the layers the model gets on the GPU and the idle instances that
must leave for it, least recently used first, in whichever budget (RAM, GPU memory, the instance
count) is short. They are unloaded and the plan is made again, measured anew; while instances in
use hold what is missing, the load waits for them to finish, up to the load timeout. Memory is
counted per instance as the larger of its estimate and what was measured (`Instance.charged`).
"""

from __future__ import annotations

import time
from typing import Generic, TypeVar

from myllm.errors import OutOfMemory
from myllm.runtime.engine_types import LoadSpec
from myllm.runtime.instance import PlacedRunner
from myllm.runtime.placement.gpu_budget import GpuBudget
from myllm.runtime.placement.instances import Instances
from myllm.runtime.placement.memory import Footprint, MemoryEstimate, MiB
from myllm.runtime.placement.planner import Budgets, Plan, plan_load

R = TypeVar("R", bound=PlacedRunner)


class Room(Generic[R]):
    """The budgets, and the plan-evict-wait loop over the loaded instances."""

    def __init__(self, instances: Instances[R], gpus: GpuBudget, budget: int, load_timeout: float,
                 max_instances: int) -> None:
        self.instances = instances
        self.gpus = gpus
        self.budget = budget
        """The RAM budget."""
        self.load_timeout = load_timeout
        """Seconds a load waits for busy instances to free what it needs."""
        self.max_instances = max_instances

    def budgets(self) -> Budgets:
        return Budgets(self.budget, self.gpus.vram_budget if self.gpus.gpu.available else 0, self.max_instances)

    def plan(self, fp: Footprint, wanted: int) -> Plan[LoadSpec]:
        """The plan for loading `fp` (at most `wanted` layers on the GPU) beside what is loaded now."""
        return plan_load(fp, wanted, self.budgets(), self.instances.residents())

    def alone(self, fp: Footprint, wanted: int) -> Plan[LoadSpec]:
        """The plan for loading `fp` with nothing else loaded: if even this does not fit, no
        eviction or wait can help."""
        return plan_load(fp, wanted, self.budgets(), [])

    def costs_others(self, spec: LoadSpec, fp: Footprint, wanted: int) -> bool:
        """Whether loading `spec` now would evict an instance (or wait for a busy one's room), or
        add a second instance of a model already loaded with other options."""
        plan = self.plan(fp, wanted)
        return bool(plan.evict) or not plan.fits or bool(self.instances.of_model(spec.name))

    def too_large(self, spec: LoadSpec, whole: MemoryEstimate, plan: Plan[LoadSpec]) -> OutOfMemory:
        """The error for a model that does not fit the whole budget (`plan` is `alone`'s)."""
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

    async def evict_idle(self) -> bool:
        """Unload every idle instance; returns whether there was one."""
        victims = [i for i in self.instances.values() if i.idle]
        for inst in victims:
            await self.instances.unload(inst, "lru")
        return bool(victims)

    async def make(self, spec: LoadSpec, fp: Footprint, wanted: int) -> Plan[LoadSpec]:
        """The plan for loading `fp` now, after unloading the idle instances it names; while busy
        instances hold what is missing, wait (up to the load timeout) for them to finish."""
        deadline = time.monotonic() + self.load_timeout
        while True:
            plan = self.plan(fp, wanted)
            victims = [inst for key in plan.evict if (inst := self.instances.get(key)) is not None and inst.idle]
            for inst in victims:
                await self.instances.unload(inst, "lru")
            if victims:
                continue  # measured again after the unloads
            if plan.fits:
                return plan
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._busy(spec, plan)
            await self.instances.changed(min(left, 1.0))

    def _busy(self, spec: LoadSpec, plan: Plan[LoadSpec]) -> OutOfMemory:
        busy = ", ".join(sorted(i.spec.name for i in self.instances.values()))
        gpu = f" and {plan.need.vram // MiB} MiB of GPU memory" if plan.need.vram else ""
        vram_budget = self.gpus.vram_budget
        return OutOfMemory(
            f"model '{spec.name}' needs about {plan.need.ram // MiB} MiB{gpu} but only "
            f"{max(0, self.budget - self.instances.used()) // MiB} MiB of the {self.budget // MiB} MiB budget"
            + (f" and {max(0, vram_budget - self.instances.vram_used()) // MiB} MiB of the {vram_budget // MiB} "
               f"MiB GPU budget" if plan.need.vram else "")
            + f" are free and the loaded models are busy ({busy}); waited {self.load_timeout:.0f}s",
            needed=plan.need.ram,
            budget=self.budget,
        )
