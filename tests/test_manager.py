"""The model manager on the real test models: shared loads, keep-alive, the memory budget."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil
import pytest

from myllm.errors import ModelLoadError, OutOfMemory
from myllm.pull import pull
from myllm.registry.store import Registry
from myllm.runtime.placement.manager import ModelManager
from myllm.runtime.placement.memory import MiB, estimate
from myllm.runtime.request.options import GenerationOptions
from myllm.runtime.service import Runtime
from myllm.settings import Settings
from tests.conftest import register_broken_model
from tests.server import tree_rss


def make_runtime(registry: Registry, **overrides: object) -> Runtime:
    settings = Settings(num_threads=2, num_ctx=1024, kv_cache="0", num_parallel=1, **overrides)  # type: ignore[arg-type]
    return Runtime(registry, settings)


async def test_concurrent_acquires_share_one_load(shared_registry: Registry) -> None:
    rt = make_runtime(shared_registry)
    leases = await asyncio.gather(*(rt.manager.acquire("smollm2:135m") for _ in range(4)))
    assert rt.manager.load_count == 1
    assert len({id(lease.runner) for lease in leases}) == 1
    for lease in leases:
        lease.release()
    await rt.close()


async def test_sampling_options_never_reload(shared_registry: Registry) -> None:
    rt = make_runtime(shared_registry)
    for opts in ({"temperature": 0}, {"temperature": 1.2, "top_k": 5}, {"top_p": 0.5, "seed": 3, "stop": ["x"]}):
        await (await rt.generate("smollm2:135m", "Hi", GenerationOptions.parse({**opts, "max_tokens": 2}))).collect()
    assert rt.manager.load_count == 1
    await (await rt.generate("smollm2:135m", "Hi", GenerationOptions(max_tokens=2, num_ctx=512))).collect()
    assert rt.manager.load_count == 2, "a different context size is a different instance"
    await rt.close()


async def test_keep_alive(shared_registry: Registry) -> None:
    rt = make_runtime(shared_registry, keep_alive="5m")
    await rt.start()
    try:
        await (await rt.generate("smollm2:135m", "Hi", GenerationOptions(max_tokens=1), keep_alive=0)).collect()
        await asyncio.sleep(0.1)
        assert rt.manager.loaded() == [], "keep_alive 0 unloads right after the request"

        await (await rt.generate("smollm2:135m", "Hi", GenerationOptions(max_tokens=1), keep_alive="300ms")).collect()
        [info] = rt.manager.loaded()
        assert info.expires_at is not None
        await asyncio.sleep(1.5)
        assert rt.manager.loaded() == [], "the background task unloaded the expired model"

        await (await rt.generate("smollm2:135m", "Hi", GenerationOptions(max_tokens=1), keep_alive=-1)).collect()
        await asyncio.sleep(0.2)
        await rt.manager.reap()
        [info] = rt.manager.loaded()
        assert info.expires_at is None, "negative keep-alive keeps the model loaded"

        await (await rt.generate("smollm2:135m", "Hi", GenerationOptions(max_tokens=1))).collect()
        [info] = rt.manager.loaded()
        assert info.expires_at is None, "a request without keep_alive keeps the model's current setting"
    finally:
        await rt.close()


async def test_explicit_load_unload_and_info(shared_registry: Registry) -> None:
    rt = make_runtime(shared_registry)
    info = await rt.manager.load("gemma3:270m")
    assert info.name == "gemma3:270m"
    assert info.context_length == 1024
    assert info.device == "cpu"
    assert info.rss_growth > 100 * MiB
    assert info.size_estimate == estimate(shared_registry.get("gemma3:270m"), 1024).total
    print(f"gemma3 estimate {info.size_estimate / MiB:.0f} MiB, measured RSS growth {info.rss_growth / MiB:.0f} MiB")
    assert rt.manager.is_loaded("gemma3:270m")
    assert await rt.manager.unload("gemma3:270m") == 1
    assert rt.manager.loaded() == []
    assert await rt.manager.unload("gemma3:270m") == 0
    await rt.close()


async def test_budget_holding_one_model_alternates(shared_registry: Registry) -> None:
    smol = estimate(shared_registry.get("smollm2:135m"), 1024).total
    gemma = estimate(shared_registry.get("gemma3:270m"), 1024).total
    budget = max(smol, gemma) + 16 * MiB
    assert smol + gemma > budget
    margin = 64 * MiB  # Python objects and library state beside the models
    rt = Runtime(shared_registry, Settings(num_threads=2, num_ctx=1024, kv_cache="0", num_parallel=1), ModelManager(
        shared_registry, Settings(num_threads=2, num_ctx=1024, kv_cache="0", num_parallel=1), budget=budget))
    baseline = tree_rss(psutil.Process())  # the test process and the runners it starts
    peaks = []
    for i in range(6):
        name = ("smollm2:135m", "gemma3:270m")[i % 2]
        await (await rt.generate(name, "Hello", GenerationOptions(max_tokens=3))).collect()
        loaded = rt.manager.loaded()
        assert [m.name for m in loaded] == [name], "each load evicted the other model"
        peaks.append(tree_rss(psutil.Process()) - baseline)
    assert rt.manager.load_count == 6
    print(f"budget {budget / MiB:.0f} MiB; RSS above baseline after each load: {[round(p / MiB) for p in peaks]} MiB")
    assert max(peaks) <= budget + margin
    await rt.close()


async def test_larger_than_budget_fails_at_once(shared_registry: Registry) -> None:
    rt = Runtime(shared_registry, Settings(num_ctx=1024, kv_cache="0", num_parallel=1),
                 ModelManager(shared_registry, Settings(num_ctx=1024, kv_cache="0", num_parallel=1), budget=100 * MiB))
    with pytest.raises(OutOfMemory) as info:
        await rt.generate("gemma3:270m", "Hi")
    assert "more than the whole memory budget of 100 MiB" in str(info.value)
    assert info.value.needed > info.value.budget == 100 * MiB
    await rt.close()


async def test_busy_model_is_never_evicted_and_load_waits(shared_registry: Registry) -> None:
    smol = estimate(shared_registry.get("smollm2:135m"), 1024).total
    gemma = estimate(shared_registry.get("gemma3:270m"), 1024).total
    settings = Settings(num_threads=2, num_ctx=1024, load_timeout="1s", kv_cache="0", num_parallel=1)
    rt = Runtime(shared_registry, settings, ModelManager(shared_registry, settings, budget=max(smol, gemma) + MiB))
    busy = await rt.generate("smollm2:135m", "Count to one hundred:", GenerationOptions(temperature=0, max_tokens=400))
    await busy.__anext__()
    with pytest.raises(OutOfMemory) as info:
        await rt.generate("gemma3:270m", "Hi", GenerationOptions(max_tokens=1))
    assert "busy (smollm2:135m)" in str(info.value) and "waited 1s" in str(info.value)
    assert [m.name for m in rt.manager.loaded()] == ["smollm2:135m"]

    # With time to wait, the load proceeds as soon as the busy request ends.
    rt.manager.load_timeout = 30
    waiting = asyncio.create_task(rt.generate("gemma3:270m", "Hi", GenerationOptions(max_tokens=1)))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await busy.collect()
    await (await waiting).collect()
    assert [m.name for m in rt.manager.loaded()] == ["gemma3:270m"]
    await rt.close()


async def test_corrupt_model_leaves_manager_as_it_was(registry: Registry, smollm2_path: Path, tmp_path: Path) -> None:
    settings = Settings(num_threads=2, num_ctx=512)
    pull(registry, settings, str(smollm2_path), name="good")
    register_broken_model(registry, "broken", smollm2_path, tmp_path)
    rt = Runtime(registry, settings)
    await rt.manager.load("good")
    with pytest.raises(ModelLoadError, match="llama.cpp could not load 'broken:latest'"):
        await rt.generate("broken", "Hi")
    assert [m.name for m in rt.manager.loaded()] == ["good:latest"]
    done = await (await rt.generate("good", "Hi", GenerationOptions(max_tokens=2))).collect()
    assert done.completion_tokens == 2
    await rt.close()
