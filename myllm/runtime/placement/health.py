"""The health watchdog: a runner that is stuck is restarted, not waited on for ever.

A runner that dies is noticed by its own exit. One that lives but no longer works is not: a
llama.cpp call that never returns holds its scheduler (or the whole interpreter), and its requests
would hang until their clients give up. Every `MYLLM_HEALTH_INTERVAL` every runner is asked at
once how it is; one that does not answer, lost its scheduler thread or made no progress for
`STALL_LIMIT` is killed (its requests fail with `ModelCrashed` saying why, and the manager forgets
it like any crashed runner), and readiness reports the restart for a minute.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from myllm.runtime.instance import PlacedRunner
from myllm.runtime.placement.instances import Instance

log = logging.getLogger(__name__)
STALL_LIMIT = 120.0
"""A scheduler step running this long is stuck: a prompt chunk takes seconds, not minutes."""
INCIDENT_MEMORY = 60.0
"""How long a restart after a failed health check counts as a problem for readiness."""
R = TypeVar("R", bound=PlacedRunner)


@dataclass(frozen=True)
class Incident:
    at: float
    model: str
    problem: str


class HealthWatch:
    """Checks runners, kills the stuck ones, and remembers what it did for readiness."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        """Seconds between checks; a runner has twice that to answer."""
        self.incidents: collections.deque[Incident] = collections.deque(maxlen=32)
        """Runners restarted after a failed health check, the latest last."""

    async def watch(self, instances: Callable[[], Sequence[Instance[R]]]) -> None:
        """Check what `instances` lists now, every `interval`, for ever."""
        while True:
            await asyncio.sleep(self.interval)
            await self.check(instances())

    async def check(self, instances: Sequence[Instance[R]]) -> list[Incident]:
        """Ask every runner at once how it is; kill those with a problem (see the module's
        docstring). A runner that merely died is handled by its exit."""
        answers = await asyncio.gather(
            *(inst.runner.health(2 * self.interval, STALL_LIMIT) for inst in instances),
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
