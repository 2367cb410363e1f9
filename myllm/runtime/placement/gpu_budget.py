"""The GPUs llama.cpp can use, as found at start, and the GPU memory budget they set.

Asked once (`devices.probe`, in a short-lived process) when the manager starts, or by the first
load if that comes first: whether there is a GPU decides what a load key holds (`num_gpu` means
nothing without one), and the memory free on it then sets the GPU budget (`MYLLM_MAX_GPU_MEMORY`,
a share of that free memory by default).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from myllm.runtime.devices import NO_GPU, Devices
from myllm.runtime.placement.memory import MiB, parse_memory

log = logging.getLogger(__name__)
DeviceProbe = Callable[[], Awaitable[Devices]]
"""-> the GPUs llama.cpp can use: `devices.probe`, or a unit test's fake device."""


class GpuBudget:
    """The answer, asked once, and the budget it sets; the manager's planner and reports read both."""

    def __init__(self, probe: DeviceProbe, max_gpu_memory: str) -> None:
        self._probe = probe
        self._max_gpu_memory = max_gpu_memory
        self._task: asyncio.Task[Devices] | None = None
        self.gpu: Devices = NO_GPU
        """What was found (no GPU until then)."""
        self.vram_budget = 0
        """The GPU memory budget (0 without a GPU), set once the GPUs are known."""

    def start(self) -> asyncio.Task[Devices]:
        """Ask, unless asked already."""
        if self._task is None:
            self._task = asyncio.create_task(self._find(), name="myllm-devices")
        return self._task

    async def devices(self) -> Devices:
        """The GPUs, asked once (at start, or by the first load)."""
        return await asyncio.shield(self.start())

    @property
    def known(self) -> bool:
        """Whether the answer has come."""
        return self._task is not None and self._task.done()

    def device_of(self, gpu_layers: int) -> str:
        """Where an instance with `gpu_layers` on the GPU computes: "cpu", or the GPU's kind ("cuda")."""
        return self.gpu.kind if gpu_layers else "cpu"

    def memory_used(self, charged: int) -> int:
        """GPU memory in use: what was not free when the daemon asked (other programs, the
        desktop), plus `charged`, what its loaded models hold."""
        return self.gpu.total - self.gpu.free + charged if self.gpu.available else 0

    async def close(self) -> None:
        """Stop asking (a probe still running is killed)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _find(self) -> Devices:
        found = await self._probe()
        self.gpu = found
        if found.available:
            self.vram_budget = parse_memory(self._max_gpu_memory, available=found.free)
            log.info("GPU: %s, %d MiB free of %d MiB; GPU memory budget %d MiB", found.name, found.free // MiB,
                     found.total // MiB, self.vram_budget // MiB)
        return found
