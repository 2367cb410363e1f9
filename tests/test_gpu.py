"""GPU offload on a machine without a GPU: the CPU build of llama.cpp reports no GPU on every
API, `num_gpu` is accepted everywhere and is part of an instance's load key, and the manager
applies the two-budget planner's decisions (layers, evictions, retries with fewer layers) with a
fake GPU device and a fake runner, named as such. The planner's own rules: test_planner.py."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert

from myllm.api.native.models import InferenceOptions
from myllm.api.ollama.inference import generation_options
from myllm.errors import InvalidOptions, ModelCrashed, OutOfMemory
from myllm.modelfile import parse
from myllm.registry.schema import ModelRow, models
from myllm.registry.store import Registry
from myllm.runtime.devices import NO_GPU, Devices, Gpu, llama_devices, probe
from myllm.runtime.engine_types import LoadSpec
from myllm.runtime.placement.manager import ModelManager
from myllm.runtime.placement.memory import MiB, footprint, movable, parse_memory, processor
from myllm.runtime.placement.planner import Budgets, plan_load
from myllm.runtime.request.options import GenerationOptions, parameter_value
from myllm.runtime.runner import ModelRunner
from myllm.runtime.runner.protocol import RunnerConfig
from myllm.settings import Settings
from tests.server import running_servers
from tests.test_manager_logic import FakeRunner as FakeCpuRunner

MYLLM = str(Path(sys.executable).parent / "myllm")
cpu_build = pytest.mark.skipif(llama_devices().available, reason="this llama.cpp was built for a GPU, and has one")
"""What only a CPU build shows (on a GPU build, bench/gpu/ is the check)."""


# -- a fake GPU, a fake runner --------------------------------------------------------------------


def fake_gpu(free_mib: int, total_mib: int = 80_000) -> Devices:
    """A GPU llama.cpp could offload to, as `devices.probe` would describe it."""
    return Devices(True, (Gpu("CUDA0", "Fake GPU 80GB", total_mib * MiB, free_mib * MiB),))


class FakeRunner(FakeCpuRunner):
    """Stands in for a runner process: loads instantly; fails a load with more GPU layers than
    `max_layers` as llama.cpp out of GPU memory would; reports the GPU memory its plan said."""

    max_layers = 10_000
    crash_above: int | None = None
    loads: list[int] = []

    @classmethod
    async def start(cls, config: RunnerConfig, max_queue: int) -> FakeRunner:
        layers = config.spec.n_gpu_layers
        cls.loads.append(layers)
        if cls.crash_above is not None and layers > cls.crash_above:
            raise ModelCrashed(f"fake CUDA error with {layers} layers (killed by SIGABRT)")
        if layers > cls.max_layers:
            raise OutOfMemory(f"fake: cudaMalloc failed with {layers} layers")
        return cls(config)


@pytest.fixture
def fake_models(registry: Registry) -> Registry:
    """Two 10-layer models of ~1 GiB (100 MiB a layer) whose rows say so, as the registry
    records a GGUF's tensors."""
    FakeRunner.max_layers, FakeRunner.crash_above, FakeRunner.loads = 10_000, None, []
    for name, params in (("m:1", {}), ("m:2", {}), ("cpu-pinned:1", {"num_gpu": 0})):
        row = ModelRow(
            name=name, digest=hashlib.sha256(name.encode()).hexdigest(), size=1110 * MiB,
            architecture="llama", family="llama", parameter_count=10**9, parameter_size="1B", quantization="Q8_0",
            context_length=4096, vocab_size=32_000, embedding_length=2048, parameters=params,
            details={"block_count": 10, "attention.head_count": 16, "attention.head_count_kv": 4,
                     "tensor_bytes": {"input": 50 * MiB, "layers": [100 * MiB] * 10, "output": 60 * MiB, "tied": False}},
        )
        with registry.engine.begin() as conn:
            conn.execute(insert(models).values(**row.values()))
    registry.problem = lambda row: None  # type: ignore[method-assign]  # fake rows have no blobs
    return registry


def manager(registry: Registry, device: Devices, **settings: object) -> ModelManager:
    async def fake_probe() -> Devices:
        return device

    values = {"num_ctx": 1024, "kv_cache": "0", "num_parallel": 1, **settings}
    return ModelManager(registry, Settings(**values), runner_factory=FakeRunner.start,  # type: ignore[arg-type]
                        budget=20_000 * MiB, devices=fake_probe)


async def use(mgr: ModelManager, name: str, **kwargs: object) -> None:
    lease = await mgr.acquire(name, **kwargs)  # type: ignore[arg-type]
    lease.release()


# -- the manager with a fake GPU -------------------------------------------------------------------


async def test_a_model_that_fits_goes_whole_to_the_fake_gpu(fake_models: Registry) -> None:
    mgr = manager(fake_models, fake_gpu(free_mib=10_000))
    await use(mgr, "m:1")
    [info] = mgr.loaded()
    assert FakeRunner.loads == [11] and info.gpu_layers == info.layers == 11
    assert info.device == "cuda" and info.processor == "100% GPU"
    assert mgr.vram_budget == parse_memory("90%", available=10_000 * MiB)
    assert info.size_vram > 0 and info.size_estimate > info.size_vram
    assert mgr.gpu_memory_used() == (80_000 - 10_000) * MiB + info.size_vram
    await mgr.close()


async def test_a_model_too_big_for_the_fake_gpu_gets_fewer_layers(fake_models: Registry) -> None:
    device = fake_gpu(free_mib=1_000)
    mgr = manager(fake_models, device)
    await use(mgr, "m:1")
    row = fake_models.get("m:1")
    fp = footprint(row, 1024)
    expected = plan_load(fp, -1, Budgets(20_000 * MiB, parse_memory("90%", available=1_000 * MiB), 3), []).gpu_layers
    [info] = mgr.loaded()
    assert 0 < expected < 11 and FakeRunner.loads == [expected] and info.gpu_layers == expected
    assert info.processor == processor(movable(fp, expected)) and info.processor.endswith("% CPU/GPU")
    await mgr.close()


async def test_num_gpu_is_part_of_the_load_key(fake_models: Registry) -> None:
    """The request's num_gpu, else the model's, else MYLLM_NUM_GPU; a different value is
    another instance, the same value (even -1 meaning "as fits") the same one."""
    mgr = manager(fake_models, fake_gpu(free_mib=10_000), num_gpu=-1)
    row = fake_models.get("m:1")
    assert mgr.spec_for(row).n_gpu_layers == -1
    assert mgr.spec_for(row, num_gpu=3).n_gpu_layers == 3 and mgr.spec_for(row, num_gpu=3) != mgr.spec_for(row)
    assert mgr.spec_for(fake_models.get("cpu-pinned:1")).n_gpu_layers == 0, "the model's PARAMETER num_gpu"
    assert mgr.spec_for(fake_models.get("cpu-pinned:1"), num_gpu=2).n_gpu_layers == 2, "the request wins"
    await use(mgr, "m:1")
    await use(mgr, "m:1", num_gpu=-1)
    await use(mgr, "m:1", num_gpu=0)
    await use(mgr, "m:1", num_gpu=4)
    await use(mgr, "cpu-pinned:1")
    assert FakeRunner.loads == [11, 0, 4, 0] and mgr.load_count == 4
    assert sorted((m.name, m.gpu_layers, m.device) for m in mgr.loaded()) == [
        ("cpu-pinned:1", 0, "cpu"), ("m:1", 0, "cpu"), ("m:1", 4, "cuda")]  # the instance limit of 3 evicted one
    assert ModelManager(fake_models, Settings(num_gpu=0)).spec_for(row).n_gpu_layers == 0
    assert mgr.spec_for(row).flash_attention == "auto"
    assert ModelManager(fake_models, Settings(flash_attention="off")).spec_for(row).flash_attention == "off"
    await mgr.close()


async def test_gpu_memory_evicts_an_idle_gpu_model(fake_models: Registry) -> None:
    """Room on the fake GPU for one model: loading the second evicts the first (idle) rather
    than loading the second with fewer layers; a CPU-only model stays."""
    mgr = manager(fake_models, fake_gpu(free_mib=1_800))
    await use(mgr, "cpu-pinned:1")
    await use(mgr, "m:1")
    await use(mgr, "m:2")
    assert FakeRunner.loads == [0, 11, 11]
    assert sorted(m.name for m in mgr.loaded()) == ["cpu-pinned:1", "m:2"]
    busy = await mgr.acquire("m:2")  # in use: never evicted; m:1 gets what is left
    await use(mgr, "m:1")
    assert FakeRunner.loads[-1] < 11 and sorted(m.name for m in mgr.loaded()) == ["cpu-pinned:1", "m:1", "m:2"]
    busy.release()
    await mgr.close()


async def test_out_of_gpu_memory_at_load_retries_with_fewer_layers(fake_models: Registry) -> None:
    FakeRunner.max_layers = 3
    mgr = manager(fake_models, fake_gpu(free_mib=10_000))
    await use(mgr, "m:1")
    assert FakeRunner.loads == [11, 5, 2], "halved until it loaded"
    assert mgr.loaded()[0].gpu_layers == 2
    await mgr.unload("m:1")
    FakeRunner.max_layers = 10_000
    await use(mgr, "m:1")
    assert FakeRunner.loads[-1] == 2, "the smaller count is remembered for a while"
    await mgr.close()


async def test_out_of_memory_everywhere_fails_in_the_api_shape(fake_models: Registry) -> None:
    FakeRunner.max_layers = -1  # even the CPU load fails
    mgr = manager(fake_models, fake_gpu(free_mib=10_000))
    with pytest.raises(OutOfMemory, match="fake: cudaMalloc failed with 0 layers"):
        await use(mgr, "m:1")
    assert FakeRunner.loads == [11, 5, 2, 1, 0], "halved down to none (nothing idle to evict for another try)"
    await mgr.close()


async def test_a_crash_with_layers_on_the_gpu_retries_with_fewer(fake_models: Registry) -> None:
    FakeRunner.crash_above = 4
    mgr = manager(fake_models, fake_gpu(free_mib=10_000))
    await use(mgr, "m:1")
    assert FakeRunner.loads == [11, 5, 2]
    assert mgr.loader.crashes.by_digest == {}, "not refused as a model that crashes llama.cpp"
    await mgr.close()


async def test_out_of_memory_while_generating_reloads_with_fewer_layers(fake_models: Registry) -> None:
    mgr = manager(fake_models, fake_gpu(free_mib=10_000))
    lease = await mgr.acquire("m:1")
    runner = lease.runner
    runner.on_out_of_memory(runner, OutOfMemory("llama.cpp ran out of memory while generating"))
    lease.release()
    await asyncio.sleep(0.05)
    assert runner.closed and mgr.loaded() == []
    await use(mgr, "m:1")
    assert FakeRunner.loads == [11, 5]

    runner = (await mgr.acquire("m:1")).runner  # a crash (CUDA aborts) halves the layers too
    runner.on_exit(runner, ModelCrashed("the runner of model 'm:1' stopped (killed by SIGABRT)"))
    await use(mgr, "m:1")
    assert FakeRunner.loads == [11, 5, 2]
    await mgr.close()


async def test_no_gpu_means_no_layers_whatever_num_gpu_says(fake_models: Registry) -> None:
    mgr = manager(fake_models, NO_GPU)
    await use(mgr, "m:1", num_gpu=8)
    [info] = mgr.loaded()
    assert FakeRunner.loads == [0] and info.gpu_layers == 0 and info.processor == "100% CPU" and info.device == "cpu"
    assert info.size_vram == 0 and mgr.vram_budget == 0 and mgr.gpu_memory_used() == 0
    await mgr.close()


# -- detection ----------------------------------------------------------------------------------


@cpu_build
async def test_this_cpu_build_has_no_gpu() -> None:
    assert llama_devices() == NO_GPU
    assert await probe() == NO_GPU, "asked in a process of its own, as the daemon asks"


def test_device_names() -> None:
    two = Devices(True, (Gpu("CUDA0", "NVIDIA H100 80GB HBM3", 80, 70), Gpu("CUDA1", "NVIDIA H100 80GB HBM3", 80, 60)))
    assert two.name == "2 x NVIDIA H100 80GB HBM3" and two.kind == "cuda" and two.free == 130 and two.total == 160
    assert Devices.from_json(two.to_json()) == two
    assert Gpu("Metal", "Apple M3", 1, 1).kind == "mps" and Gpu("Vulkan0", "x", 1, 1).kind == "vulkan"
    assert NO_GPU.name is None and NO_GPU.kind == "cpu" and not Devices(True, ()).available


# -- num_gpu wherever options are given ----------------------------------------------------------


def test_num_gpu_option_everywhere() -> None:
    assert GenerationOptions.parse({"num_gpu": 0}).num_gpu == 0
    assert GenerationOptions.parse({"num_gpu": -1}).num_gpu == -1
    with pytest.raises(InvalidOptions, match="num_gpu"):
        GenerationOptions.parse({"num_gpu": -2})
    assert parameter_value("num_gpu", "12") == 12, "the REPL's /set parameter"
    assert parse("FROM smollm2:135m\nPARAMETER num_gpu 0\n").parameters == {"num_gpu": 0}
    assert generation_options({"num_gpu": 7, "main_gpu": 1, "num_thread": 4}, None).num_gpu == 7, \
        "Ollama's num_gpu is a real option now (main_gpu and num_thread are still the daemon's)"
    assert InferenceOptions(num_gpu=3).model_dump()["num_gpu"] == 3
    over = GenerationOptions.parse({"temperature": 0}).over(GenerationOptions.parse({"num_gpu": 2}))
    assert over.num_gpu == 2, "a model's stored num_gpu applies under the request's options"
    assert LoadSpec.for_model(ModelRow(name="x", context_length=0), Path("/x"), 512, 5).n_gpu_layers == 5


# -- a real daemon on this CPU build: no GPU on any API ---------------------------------------------


@pytest.fixture(scope="module")
def daemon(models_home: Path) -> Iterator[tuple[str, str]]:
    with running_servers(Settings(home=models_home, num_threads=2, num_ctx=1024, num_parallel=1)) as urls:
        yield urls


@cpu_build
def test_the_cpu_build_reports_no_gpu_everywhere(daemon: tuple[str, str]) -> None:
    main, ollama_url = daemon
    generated = httpx.post(f"{main}/generate", json={"prompt": "Hello", "max_tokens": 2}, timeout=120).json()
    assert generated["metadata"]["device"] == "cpu"
    assert httpx.get(f"{main}/model_status").json()["device"] == "cpu"

    [native] = [m for m in httpx.get(f"{main}/api/ps").json()["models"] if m["name"] == "smollm2:135m"]
    assert native["processor"] == "100% CPU" and native["size_vram_mb"] == 0 and native["vram_used_mb"] == 0
    assert native["gpu_layers"] == 0 and native["layers"] == 31
    [ollama_ps] = [m for m in httpx.get(f"{ollama_url}/api/ps").json()["models"] if m["name"] == "smollm2:135m"]
    assert ollama_ps["size_vram"] == 0 and ollama_ps["size"] > 0

    status = httpx.get(f"{main}/status").json()
    assert status["system"]["gpu_available"] is False and status["system"]["gpu_name"] is None
    assert status["system"]["gpu_memory_total_mb"] is None and status["system"]["gpu_memory_used_mb"] is None
    assert status["model"]["device"] == "cpu" and all(m["device"] == "cpu" for m in status["loaded_models"])

    port = main.rsplit(":", 1)[1]
    table = subprocess.run([MYLLM, "ps", "--port", port], capture_output=True, text=True, timeout=60,
                           env=os.environ.copy()).stdout
    row = next(line for line in table.splitlines() if "smollm2:135m" in line)
    assert "100% CPU" in row


@cpu_build
def test_num_gpu_on_a_cpu_build_is_the_same_instance(daemon: tuple[str, str]) -> None:
    """Without a GPU every `num_gpu` loads the same (nothing goes to a GPU), so `num_gpu: 0` and
    the default (-1, as many as fit) share one instance: a key cycling num_gpu loads nothing
    (issue 27, case 8)."""
    main, ollama_url = daemon
    for url, body in ((f"{main}/api/generate", {"options": {"num_gpu": 0, "max_tokens": 1}}),
                      (f"{ollama_url}/api/generate", {"options": {"num_gpu": 0, "num_predict": 1}, "stream": False})):
        assert httpx.post(url, json={"model": "smollm2:135m", "prompt": "Hi", **body}, timeout=120).status_code == 200
    loaded = [m for m in httpx.get(f"{main}/api/ps").json()["models"] if m["name"] == "smollm2:135m"]
    assert len(loaded) == 1 and all(m["gpu_layers"] == 0 and m["processor"] == "100% CPU" for m in loaded)


# -- a runner's segfault leaves a Python traceback in the log ----------------------------------------


async def test_a_segfaulting_runner_logs_its_python_traceback(
    shared_registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    row = shared_registry.get("smollm2:135m")
    runner = await ModelRunner.start(RunnerConfig(LoadSpec.for_model(row, shared_registry.blobs.path(row.digest), 512), 1, 0), 4)
    died = asyncio.Event()
    runner.on_exit = lambda r, error: died.set()
    with caplog.at_level(logging.ERROR, logger="myllm.runtime.runner.client"):
        assert runner.pid is not None
        os.kill(runner.pid, signal.SIGSEGV)
        await asyncio.wait_for(died.wait(), 30)
    assert runner.exit_error is not None
    assert "(killed by SIGSEGV: Fatal Python error: Segmentation fault)" in runner.exit_error.message
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Fatal Python error: Segmentation fault" in logged
    assert 'File "' in logged and "child.py" in logged, "every thread's Python stack, the runner's main loop too"
