"""RPC workers that went away under a loaded model, left out of its next loads.

llama.cpp's RPC client aborts the runner when a worker stops answering mid-request, so the
requests on it fail (`model_crashed`, naming the workers). The model must then load again
without that worker rather than fail every request until someone edits the settings: when a
runner with workers dies, its workers are taken to be lost, and the load keys built after it
(`ModelManager.spec_for`) leave them out, so the model reloads on the workers left, or on this
machine alone. At most every `RECHECK` seconds, while any is lost, the next request first tries
each lost worker's port; one that accepts connections again is used again from that load on
(its model loads on it; the instance without it expires with its keep-alive).

A worker named in the settings that never answered is not lost: its load fails naming it
(engine/rpc.py), since a typo there is a mistake to report, not a machine to route around.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

RECHECK = 5.0
"""Seconds between tries of the lost workers' ports (only while some are lost)."""
PROBE_TIMEOUT = 1.0
"""Seconds a lost worker's port has to accept a connection."""


class LostWorkers:
    def __init__(self) -> None:
        self._lost: set[str] = set()
        self._checked = 0.0

    def usable(self, servers: Sequence[str]) -> tuple[str, ...]:
        """`servers` without the lost ones."""
        return tuple(s for s in servers if s not in self._lost)

    def lose(self, servers: Sequence[str]) -> None:
        """A runner on `servers` died: leave them out until their ports answer again."""
        if servers:
            log.warning("leaving RPC workers %s out of the next loads until they answer again", ", ".join(servers))
            self._lost.update(servers)
            self._checked = time.monotonic()

    async def recheck(self) -> None:
        """Take back the lost workers whose ports accept connections (every `RECHECK` s at most)."""
        if not self._lost or time.monotonic() - self._checked < RECHECK:
            return
        self._checked = time.monotonic()
        lost = sorted(self._lost)
        for endpoint, up in zip(lost, await asyncio.gather(*(_accepts(e) for e in lost)), strict=True):
            if up:
                log.info("RPC worker %s answers again", endpoint)
                self._lost.discard(endpoint)


async def _accepts(endpoint: str) -> bool:
    host, _, port = endpoint.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), PROBE_TIMEOUT)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True
