"""Where a model about to load goes: how many of its layers on the GPU, and which idle models
must leave first, with two budgets (RAM and GPU memory). Pure logic over numbers, so it is tested
with a fake device; the manager applies the plan (runtime/placement/room.py).

The rules, as Ollama's scheduler decides:
- Layers: `wanted` is the most the request allows (-1: all of them; 0: none; the setting
  `MYLLM_NUM_GPU`, or `num_gpu` of the request or the model). The plan takes the most layers,
  up to that, whose GPU share fits the GPU budget once every idle model has left it; a model
  that does not fit whole gets fewer layers (the rest runs on the CPU) instead of failing.
- Evictions: idle models, least recently used first, leave while the new model does not fit:
  one is only evicted for a budget it frees (a CPU-only model never leaves for GPU memory) or
  for the instance limit. Models in use never leave; what they hold is waited for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from myllm.runtime.engine_types import LoadSpec
from myllm.runtime.placement.memory import Footprint, Split

K = TypeVar("K")


@dataclass(frozen=True)
class Resident(Generic[K]):
    """A loaded instance as the planner sees it."""

    key: K
    held: Split
    """What it is charged with in each budget."""
    idle: bool
    last_used: float


@dataclass(frozen=True)
class Budgets:
    ram: int
    vram: int
    """0 without a GPU llama.cpp can use: then nothing is offloaded."""
    instances: int
    """Most instances loaded at once."""


@dataclass(frozen=True)
class Plan(Generic[K]):
    gpu_layers: int
    need: Split
    evict: tuple[K, ...]
    """Idle instances to unload first, in order."""
    fits: bool
    """False: even after those leave, models in use hold what is missing (the load waits)."""
    short: Split
    """What is missing while `fits` is False (0 where nothing is)."""


def layers_for(fp: Footprint, wanted: int, vram_room: int) -> int:
    """The most layers, at most `wanted` (-1: all), whose GPU share fits `vram_room`."""
    top = fp.max_gpu_layers if wanted < 0 else min(wanted, fp.max_gpu_layers)
    for k in range(top, 0, -1):
        if fp.split(k).vram <= vram_room:
            return k
    return 0


def plan_load(fp: Footprint, wanted: int, budgets: Budgets, residents: Sequence[Resident[K]]) -> Plan[K]:
    """The plan for loading `fp` beside `residents` (see the module's docstring)."""
    busy_vram = sum(r.held.vram for r in residents if not r.idle)
    layers = layers_for(fp, wanted, budgets.vram - busy_vram) if budgets.vram > 0 else 0
    need = fp.split(layers)
    ram = sum(r.held.ram for r in residents) + need.ram
    vram = sum(r.held.vram for r in residents) + need.vram
    count = len(residents) + 1

    def short() -> Split:
        """What is missing in each budget; GPU memory only counts when this load takes some
        (models already over the GPU budget are no reason to evict for a CPU-only load)."""
        return Split(max(0, ram - budgets.ram), max(0, vram - budgets.vram) if need.vram else 0)

    evict: list[K] = []
    for r in sorted((r for r in residents if r.idle), key=lambda r: r.last_used):
        missing, too_many = short(), count > budgets.instances
        if not (missing.ram or missing.vram or too_many):
            break
        if too_many or (missing.ram and r.held.ram > 0) or (missing.vram and r.held.vram > 0):
            evict.append(r.key)
            ram, vram, count = ram - r.held.ram, vram - r.held.vram, count - 1
    missing = short()
    fits = not missing.ram and not missing.vram and count <= budgets.instances
    return Plan(layers, need, tuple(evict), fits, missing)


def worker_bytes(spec: LoadSpec, fp: Footprint) -> tuple[int, ...]:
    """What k layers on RPC workers take, for each k from 0 to what `spec` asks (-1: all), as a
    GPU's share of `fp` without what only a local GPU holds (its CUDA context) or only a local
    device runs (a vision projector, kept on this machine): the runner picks the most that fit
    the workers' free memory, which it alone can ask (a worker serves one client at a time).
    Empty without workers."""
    if not spec.rpc_servers:
        return ()
    top = fp.max_gpu_layers if spec.n_gpu_layers < 0 else min(spec.n_gpu_layers, fp.max_gpu_layers)
    remote = dataclasses.replace(fp, gpu_overhead=0, projector=0)
    return tuple(remote.split(k).vram for k in range(top + 1))
