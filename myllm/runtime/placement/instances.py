"""The loaded instances by load key: what each holds and does, and the one way one leaves.

Every part of the manager reads this table (the planner its residents, keep-alive its deadlines,
the watchdog its runners, `ps` its rows) and changes it only here, so an unload is logged, told
to the runtime's watchers and wakes the loads waiting for room in one place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from myllm.registry.schema import ModelRow
from myllm.runtime.engine_types import LoadSpec
from myllm.runtime.hooks import RuntimeEvents
from myllm.runtime.instance import PlacedRunner
from myllm.runtime.placement.memory import Footprint, MemoryEstimate, Split
from myllm.runtime.placement.planner import Resident

log = logging.getLogger(__name__)
R = TypeVar("R", bound=PlacedRunner)


@dataclass
class Instance(Generic[R]):
    spec: LoadSpec
    """The load key: `n_gpu_layers` is what was asked for (-1: as many as fit)."""
    row: ModelRow
    runner: R
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


class Instances(Generic[R]):
    """The table (see the module's docstring)."""

    def __init__(self) -> None:
        self._by_spec: dict[LoadSpec, Instance[R]] = {}
        self._changed = asyncio.Condition()
        """Notified when an instance leaves or is released: a load waiting for room looks again."""
        self.events = RuntimeEvents()
        """Told of loads and unloads (the daemon puts its metrics here)."""

    def get(self, spec: LoadSpec) -> Instance[R] | None:
        return self._by_spec.get(spec)

    def values(self) -> list[Instance[R]]:
        """Every instance (a list of its own: callers unload while they go through it)."""
        return list(self._by_spec.values())

    def of_model(self, name: str) -> list[Instance[R]]:
        return [i for i in self._by_spec.values() if i.spec.name == name]

    def running(self, runner: PlacedRunner) -> Instance[R] | None:
        """The instance `runner` runs, while it is loaded."""
        return next((i for i in self._by_spec.values() if i.runner is runner), None)

    def add(self, inst: Instance[R]) -> None:
        self._by_spec[inst.spec] = inst

    def holds(self, inst: Instance[R]) -> bool:
        """Whether `inst` is still loaded (not unloaded, its runner alive)."""
        return self._by_spec.get(inst.spec) is inst

    def forget(self, inst: Instance[R], reason: str) -> None:
        """Drop an instance whose runner has gone already (nothing to close)."""
        del self._by_spec[inst.spec]
        self.events.model_unloaded(inst.spec.name, reason)

    async def unload(self, inst: Instance[R], reason: str = "unload") -> None:
        """Close `inst`'s runner (what runs on it fails with `ShuttingDown`) and drop it; a no-op
        once it has left. `reason`: see `RuntimeEvents.model_unloaded`."""
        if not self.holds(inst):
            return
        del self._by_spec[inst.spec]
        await inst.runner.close()
        log.info("unloaded %s (%s)", inst.spec.name, reason)
        self.events.model_unloaded(inst.spec.name, reason)
        await self.notify()

    async def notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def changed(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) for an instance to leave or be released."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=timeout)
            except TimeoutError:
                pass

    def used(self) -> int:
        """RAM charged to loaded instances."""
        return sum(i.charged.ram for i in self._by_spec.values())

    def vram_used(self) -> int:
        """GPU memory charged to loaded instances."""
        return sum(i.charged.vram for i in self._by_spec.values())

    def residents(self) -> list[Resident[LoadSpec]]:
        """The instances as the planner sees them."""
        return [Resident(spec, inst.charged, inst.idle, inst.last_used) for spec, inst in self._by_spec.items()]
