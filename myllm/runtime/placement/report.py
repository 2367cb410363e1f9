"""What `ps` shows of the loaded models: one row per instance (`LoadedInfo`), and the rows of
one model added up (`per_model`), as Ollama lists models.

A row is a snapshot the APIs translate (Ollama's `ps`, the native API's, DeepShiva's status, the
metrics): memory estimated and measured, where the layers went, keep-alive, and the work in
flight. Kept apart from the manager so every API reads one shape without reaching into it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TypeVar

from myllm.runtime.instance import PlacedRunner
from myllm.runtime.placement.instances import Instance
from myllm.runtime.placement.memory import Split, movable, processor

R = TypeVar("R", bound=PlacedRunner)


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


def describe(inst: Instance[R], device: str) -> LoadedInfo:
    """`inst`'s row; `device`: where it computes ("cpu", or the GPU's kind)."""
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
        pid=inst.runner.pid,
        expires_at=expires,
        device=device,
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
