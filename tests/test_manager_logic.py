"""Pure scheduling logic of the model manager (eviction order, the instance limit, the
retry after a failed allocation, the refusal after a crashed load), with a fake runner named as
such. Everything that runs a model is tested on the real models elsewhere."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import insert, update

from myllm.errors import ModelCrashed, MyLLMError, OutOfMemory
from myllm.registry.schema import ModelRow, models
from myllm.registry.store import Registry
from myllm.runtime.instance import ExitHandler, RunnerStats
from myllm.runtime.placement import manager as manager_module
from myllm.runtime.placement import report
from myllm.runtime.placement.manager import ModelManager
from myllm.runtime.placement.memory import MiB, Split, estimate
from myllm.runtime.placement.report import LoadedInfo
from myllm.runtime.runner.protocol import RunnerConfig
from myllm.settings import Settings


class FakeRunner:
    """Stands in for a runner process (a `PlacedRunner`, as `ModelRunner` is): loads instantly,
    holds no memory, never busy, always healthy, computes nothing."""

    fail_next_with_oom = 0
    crash_next = 0
    created: list[str] = []
    busy = False
    queued = 0
    generating = 0
    rss_before = rss_after = vram_used = 0
    pid = None
    given_cliffs: list[tuple[str, float | None]] = []
    """Each load's `attention_cliff` as the manager passed it."""

    def __init__(self, config: RunnerConfig) -> None:
        self.spec = config.spec
        FakeRunner.given_cliffs.append((config.spec.name, config.attention_cliff))
        # What a runner measures on its first load of a model, and reports as given after.
        self.attention_cliff = config.attention_cliff or 1.7
        self.kv_cache_bytes = config.kv_cache_bytes
        self.closed = False
        self.on_exit: ExitHandler | None = None
        self.on_out_of_memory: ExitHandler | None = None
        FakeRunner.created.append(config.spec.name)

    @classmethod
    async def start(cls, config: RunnerConfig, max_queue: int) -> FakeRunner:
        if cls.fail_next_with_oom:
            cls.fail_next_with_oom -= 1
            raise OutOfMemory(f"fake allocation failure for {config.spec.name}")
        if cls.crash_next:
            cls.crash_next -= 1
            raise ModelCrashed(f"fake crash loading {config.spec.name}")
        return cls(config)

    def rss(self) -> int:
        return 0

    async def health(self, timeout: float, stall_limit: float) -> str | None:
        return None

    async def stats(self) -> RunnerStats:
        return {}

    def abort(self, error: MyLLMError) -> None:
        pass

    def kill(self, reason: str) -> None:
        self.closed = True

    async def close(self) -> None:
        self.closed = True


def add_fake_row(registry: Registry, name: str, size_mib: int) -> ModelRow:
    row = ModelRow(
        name=name, digest=hashlib.sha256(name.encode()).hexdigest(), size=size_mib * MiB,
        architecture="llama", family="llama", parameter_count=1, parameter_size="1M", quantization="Q4_0",
        context_length=512, vocab_size=0, parameters={}, details={"block_count": 0},
    )
    with registry.engine.begin() as conn:
        row.id = conn.execute(insert(models).values(**row.values())).inserted_primary_key[0]
    return row


@pytest.fixture
def fake_registry(registry: Registry) -> Registry:
    FakeRunner.created, FakeRunner.given_cliffs = [], []
    FakeRunner.fail_next_with_oom = FakeRunner.crash_next = 0
    for name in ("a:1", "b:1", "c:1"):
        add_fake_row(registry, name, 100)
    add_fake_row(registry, "big:1", 250)
    registry.problem = lambda row: None  # type: ignore[method-assign]  # fake rows have no blobs to check
    return registry


def manager(registry: Registry, budget_mib: int, max_loaded: int = 3) -> ModelManager:
    settings = Settings(num_ctx=512, max_loaded_models=max_loaded, kv_cache="0")
    return ModelManager(registry, settings, runner_factory=FakeRunner.start, budget=budget_mib * MiB)


def per_model(registry: Registry) -> int:
    return estimate(registry.get("a:1"), 512).total // MiB + 1


async def use(mgr: ModelManager, name: str) -> None:
    lease = await mgr.acquire(name)
    lease.release()


async def test_lru_victim_is_least_recently_used(fake_registry: Registry) -> None:
    mgr = manager(fake_registry, budget_mib=3 * per_model(fake_registry) + 50)
    for name in ("a:1", "b:1", "c:1"):
        await use(mgr, name)
    await use(mgr, "a:1")  # a is now the most recent; b the least
    await use(mgr, "big:1")  # needs the room of two 100 MiB models
    assert sorted(m.name for m in mgr.loaded()) == ["a:1", "big:1"]
    await mgr.close()


async def test_instance_limit_evicts_lru(fake_registry: Registry) -> None:
    mgr = manager(fake_registry, budget_mib=10_000, max_loaded=2)
    await use(mgr, "a:1")
    await use(mgr, "b:1")
    await use(mgr, "c:1")
    assert sorted(m.name for m in mgr.loaded()) == ["b:1", "c:1"]
    await mgr.close()


async def test_leased_instance_is_never_victim(fake_registry: Registry) -> None:
    mgr = manager(fake_registry, budget_mib=2 * per_model(fake_registry))
    mgr.load_timeout = 0.2
    held = await mgr.acquire("a:1")
    await use(mgr, "b:1")
    await use(mgr, "c:1")  # evicts idle b, never leased a
    assert sorted(m.name for m in mgr.loaded()) == ["a:1", "c:1"]
    held.release()
    await mgr.close()


async def test_a_reload_is_given_the_attention_cliff_its_model_measured(fake_registry: Registry) -> None:
    """What a runner measured of the CPU's attention paths goes to the next load of the same
    model file (a reload skips measuring: `measure_cliff` evaluates a few hundred tokens), and
    never to another model."""
    mgr = manager(fake_registry, budget_mib=10_000, max_loaded=1)
    for name in ("a:1", "b:1", "a:1"):
        await use(mgr, name)
    assert FakeRunner.given_cliffs == [("a:1", None), ("b:1", None), ("a:1", 1.7)]
    await mgr.close()


async def test_allocation_failure_evicts_idle_and_retries_once(fake_registry: Registry) -> None:
    mgr = manager(fake_registry, budget_mib=10_000)
    await use(mgr, "a:1")
    await use(mgr, "b:1")
    FakeRunner.fail_next_with_oom = 1
    await use(mgr, "c:1")
    assert [m.name for m in mgr.loaded()] == ["c:1"], "idle models were unloaded before the retry"

    held = await mgr.acquire("c:1")
    FakeRunner.fail_next_with_oom = 2
    with pytest.raises(OutOfMemory, match="fake allocation failure"):
        await use(mgr, "a:1")
    assert [m.name for m in mgr.loaded()] == ["c:1"], "the busy model kept serving"
    held.release()
    await mgr.close()


@pytest.mark.parametrize("setting", ["auto", "256MiB", "0"])
async def test_saved_kv_cache_size_follows_the_setting(registry: Registry, setting: str) -> None:
    """`auto` sizes a model's cache of conversation KV states like its own context KV (a fixed
    size would hold dozens of a small model's conversations and not one of a 7B model's); the
    cache counts in the load estimate either way."""
    FakeRunner.fail_next_with_oom = 0
    row = add_fake_row(registry, "gqa:1", 100)
    with registry.engine.begin() as conn:
        conn.execute(update(models).where(models.c.id == row.id).values(details={
            "block_count": 30, "attention.head_count": 9, "attention.head_count_kv": 3,
            "attention.key_length": 64, "attention.value_length": 64}))
    registry.problem = lambda row: None  # type: ignore[method-assign]
    settings = Settings(num_ctx=512, kv_cache=setting, num_parallel=2)
    mgr = ModelManager(registry, settings, runner_factory=FakeRunner.start, budget=4096 * MiB)
    lease = await mgr.acquire("gqa:1")
    context_kv = 30 * 3 * (64 + 64) * 2 * 512 * 2  # two sequences of 512 tokens
    expected = {"auto": context_kv, "256MiB": 256 * MiB, "0": 0}[setting]
    assert lease.runner.kv_cache_bytes == expected
    assert lease.instance.estimate.kv_cache == context_kv + expected
    lease.release()
    await mgr.close()


def test_unreadable_kv_cache_setting_is_refused(registry: Registry) -> None:
    with pytest.raises(ValueError, match="lots"):
        ModelManager(registry, Settings(kv_cache="lots"))


async def test_a_load_that_crashes_is_refused_for_a_while(fake_registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that crashes llama.cpp is not loaded again on every request: it is refused,
    naming the crash, until its back-off (doubling after each further crash) has passed; other
    models load meanwhile, and a load that succeeds clears the record."""
    clock = [1000.0]
    monkeypatch.setattr(manager_module.time, "monotonic", lambda: clock[0])
    mgr = manager(fake_registry, budget_mib=10_000)
    FakeRunner.crash_next = 1
    with pytest.raises(ModelCrashed, match="fake crash loading a:1"):
        await use(mgr, "a:1")
    with pytest.raises(ModelCrashed, match=r"crashed its runner while loading 0s ago .*not trying again for 30s"):
        await use(mgr, "a:1")
    assert FakeRunner.created == [], "no second runner was started"
    await use(mgr, "b:1")
    clock[0] += 31
    FakeRunner.crash_next = 1
    with pytest.raises(ModelCrashed, match="fake crash"):
        await use(mgr, "a:1")
    clock[0] += 31
    with pytest.raises(ModelCrashed, match="not trying again for 29s"):
        await use(mgr, "a:1")
    clock[0] += 30
    await use(mgr, "a:1")
    assert sorted(m.name for m in mgr.loaded()) == ["a:1", "b:1"]
    await mgr.close()


def test_instances_of_one_model_are_one_row_adding_up_what_they_hold() -> None:
    """`per_model`: rows in order, one per name; memory, layers and slots add up, the largest
    context, the latest expiry, a GPU's device if any instance has layers there, and the
    PROCESSOR share over all the bytes offloading moved."""
    at = datetime(2030, 1, 1, tzinfo=timezone.utc)
    chat = LoadedInfo(name="m:1", digest="d", context_length=2048, embedding=False, size_estimate=300 * MiB, rss_before=10,
                      rss_after=110, rss=120, pid=7, expires_at=at, device="cuda", gpu_layers=31, layers=31,
                      size_vram=250 * MiB, offload=Split(0, 200 * MiB), vram_used=260 * MiB, active=1, queued=2, busy=1,
                      slots=4)
    embed = dataclasses.replace(chat, context_length=512, embedding=True, size_estimate=100 * MiB, rss_before=20, rss_after=70,
                                rss=80, pid=8, expires_at=at + timedelta(minutes=5), device="cpu", gpu_layers=0,
                                size_vram=0, offload=Split(200 * MiB, 0), vram_used=0, active=0, queued=0, busy=0, slots=1)
    other = dataclasses.replace(chat, name="n:1", pid=9)
    mine, theirs = report.per_model([chat, embed, other])
    assert theirs == other, "a model loaded once is its instance's row"
    assert mine == LoadedInfo(name="m:1", digest="d", context_length=2048, embedding=False, size_estimate=400 * MiB,
                              rss_before=30, rss_after=180, rss=200, pid=None, expires_at=at + timedelta(minutes=5),
                              device="cuda", gpu_layers=31, layers=62, size_vram=250 * MiB, offload=Split(200 * MiB, 200 * MiB),
                              vram_used=260 * MiB, active=1, queued=2, busy=1, slots=5)
    assert mine.processor == "50%/50% CPU/GPU" and mine.rss_growth == 150
    [kept] = report.per_model([chat, dataclasses.replace(embed, expires_at=None)])
    assert kept.expires_at is None, "an instance kept for good keeps the model loaded for good"
