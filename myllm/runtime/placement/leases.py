"""Leases and keep-alive: who is using which instance, and when an unused one leaves.

A request takes a *lease* on a loaded instance and returns it when done. An instance with leases
is never unloaded by eviction or keep-alive; its keep-alive timer starts when the last lease is
returned: the request's `keep_alive` if it gave one, else what the instance had (the daemon's
default when it loaded). 0 unloads it as soon as it is idle; a negative one keeps it for good. A
background task unloads the idle instances whose time is up.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Generic, TypeVar

from myllm.registry.schema import ModelRow
from myllm.runtime.instance import PlacedRunner
from myllm.runtime.placement.instances import Instance, Instances
from myllm.runtime.request.durations import parse_duration

R = TypeVar("R", bound=PlacedRunner)


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


def requested(keep_alive: KeepAlive) -> tuple[float | None, bool]:
    """A request's keep-alive in seconds (None: not given), and whether it may only lengthen;
    read before anything loads, so a bad duration is refused first."""
    given = keep_alive.value if isinstance(keep_alive, ExtendOnly) else keep_alive
    return None if given is None else parse_duration(given), isinstance(keep_alive, ExtendOnly)


class Lease(Generic[R]):
    """The right to use one loaded instance for one request. Release exactly once."""

    def __init__(self, leases: Leases[R], instance: Instance[R], keep_alive: float | None, extend_only: bool,
                 device: str) -> None:
        self._leases = leases
        self.instance = instance
        self.keep_alive = keep_alive
        self.extend_only = extend_only
        self.device = device
        """Where the model computes: "cpu", or the GPU's kind ("cuda") when layers are there."""
        self._released = False

    @property
    def runner(self) -> R:
        return self.instance.runner

    @property
    def row(self) -> ModelRow:
        return self.instance.row

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._leases.release(self.instance, self.keep_alive, self.extend_only)


class Leases(Generic[R]):
    """Counts the leases on each instance, sets its keep-alive deadline when the last one
    returns, and unloads the instances whose deadline has passed."""

    def __init__(self, instances: Instances[R]) -> None:
        self.instances = instances

    def take(self, inst: Instance[R], keep_alive: float | None, extend_only: bool, device: str) -> Lease[R]:
        inst.leases += 1
        inst.expires_at = None
        inst.last_used = time.monotonic()
        return Lease(self, inst, keep_alive, extend_only, device)

    def release(self, inst: Instance[R], keep_alive: float | None, extend_only: bool) -> None:
        inst.leases -= 1
        inst.last_used = time.monotonic()
        if not self.instances.holds(inst):  # unloaded, or its runner died
            return
        if keep_alive is not None and (not extend_only or outlasts(keep_alive, inst.keep_alive)):
            inst.keep_alive = keep_alive
        if inst.leases == 0:
            inst.expires_at = None if inst.keep_alive < 0 else inst.last_used + inst.keep_alive
        asyncio.get_running_loop().create_task(self._after_release(inst))

    async def _after_release(self, inst: Instance[R]) -> None:
        if inst.keep_alive == 0 and inst.leases == 0:
            await self.reap()
        await self.instances.notify()

    async def reap(self) -> list[str]:
        """Unload the idle instances whose keep-alive has run out; their names."""
        now = time.monotonic()
        expired = [i for i in self.instances.values() if i.idle and i.expires_at is not None and i.expires_at <= now]
        for inst in expired:
            await self.instances.unload(inst, "keep_alive")
        return [i.spec.name for i in expired]

    async def reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self._next_wakeup())
            await self.reap()

    def _next_wakeup(self) -> float:
        deadlines = [i.expires_at for i in self.instances.values() if i.expires_at is not None]
        if not deadlines:
            return 1.0
        return min(1.0, max(0.01, min(deadlines) - time.monotonic()))
