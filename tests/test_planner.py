"""The two-budget planner (runtime/placement/planner.py) and the layer split it plans with
(runtime/placement/memory.py), as pure logic: a fake GPU device of a given free memory, models made of
round numbers. No model runs here; test_gpu.py runs the manager with the same fake device."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from myllm.registry.gguf_meta import read_gguf_info
from myllm.registry.schema import ModelRow
from myllm.runtime.placement.memory import (
    COMPUTE_BASE,
    Footprint,
    MiB,
    Split,
    estimate,
    footprint,
    movable,
    parse_memory,
    processor,
)
from myllm.runtime.placement.planner import Budgets, Resident, layers_for, plan_load
from tests.conftest import smollm2_file


@dataclass(frozen=True)
class FakeGpu:
    """Stands in for a GPU: only its free memory matters to the planner, whose budget is
    MYLLM_MAX_GPU_MEMORY of it (90% by default)."""

    free_mib: int

    def budget(self, setting: str = "90%") -> int:
        return parse_memory(setting, available=self.free_mib * MiB)


def model(layers: int = 10, layer_mib: int = 100) -> Footprint:
    """10 layers of 100 MiB, 20 MiB of KV each; input 50, output 60 MiB; compute 30 MiB;
    the runner 80 MiB; the GPU's own overhead 100 MiB."""
    return Footprint(process=80 * MiB, input=50 * MiB, layers=(layer_mib * MiB,) * layers, output=60 * MiB,
                     output_on_cpu=60 * MiB, kv_layer=20 * MiB, saved_kv=0, compute=30 * MiB, gpu_overhead=100 * MiB)


def budgets(ram_mib: int = 100_000, gpu: FakeGpu | None = None, instances: int = 3) -> Budgets:
    return Budgets(ram_mib * MiB, gpu.budget() if gpu else 0, instances)


def resident(key: str, ram_mib: int, vram_mib: int, idle: bool = True, last_used: float = 0.0) -> Resident[str]:
    return Resident(key, Split(ram_mib * MiB, vram_mib * MiB), idle, last_used)


# -- the split, as llama.cpp counts layers ------------------------------------------------------


def test_split_puts_the_output_layer_first_then_the_last_layers() -> None:
    fp = model()
    assert fp.max_gpu_layers == 11
    cpu = fp.split(0)
    assert cpu == Split((80 + 50 + 1000 + 60 + 10 * 20 + 30) * MiB, 0)
    one = fp.split(1)  # the output layer alone: its weights and the logits' compute buffers
    assert one.vram == (100 + 60 + 30) * MiB
    assert one.ram == (80 + 50 + 1000 + 10 * 20) * MiB + COMPUTE_BASE
    three = fp.split(3)  # and the last two repeating layers with their KV
    assert three.vram == one.vram + 2 * (100 + 20) * MiB
    assert three.ram == one.ram - 2 * (100 + 20) * MiB
    full = fp.split(11)
    assert full.ram == (80 + 50) * MiB + COMPUTE_BASE, "the input embeddings always stay on the CPU"
    assert fp.split(99) == full and fp.split(-1) == cpu


def test_processor_column_splits_what_offloading_moves() -> None:
    """Ollama's PROCESSOR column: what stays put however many layers move (the runner, the
    input embeddings, the GPU's own overhead) is not counted."""
    fp = model()
    def column(gpu_layers: int) -> str:
        return processor(movable(fp, gpu_layers))

    assert column(0) == "100% CPU" and column(11) == "100% GPU" and column(50) == "100% GPU"
    # 6 layers: the output (60 MiB + 30 of compute buffers) and 5 layers with their KV (5 x 120)
    # on the GPU, 690 MiB; the other 5 layers with theirs on the CPU, 600 MiB: 47% of 1290.
    assert column(6) == "47%/53% CPU/GPU"
    assert column(1).startswith("9")
    # A model loaded twice, once on the CPU (1274 MiB moved there) and once on the GPU (1290 MiB).
    assert processor(Split(movable(fp, 0).ram, movable(fp, 11).vram)) == "50%/50% CPU/GPU"


def test_a_tied_output_is_free_on_the_cpu_and_copied_to_a_gpu() -> None:
    tied = Footprint(80 * MiB, 50 * MiB, (100 * MiB,) * 4, output=50 * MiB, output_on_cpu=0, kv_layer=0, saved_kv=0,
                     compute=0, gpu_overhead=0)
    assert tied.split(0).ram == (80 + 50 + 400) * MiB
    assert tied.split(1).vram == 50 * MiB


def test_footprint_of_a_real_model_adds_up_to_the_cpu_estimate() -> None:
    """SmolLM2 (tied embeddings, 30 layers): with its tensor sizes, and from the file size alone
    (a model registered before they were recorded), no layer offloaded is `estimate()`'s RAM."""
    info = read_gguf_info(smollm2_file(), "smollm2")
    row = ModelRow(size=smollm2_file().stat().st_size, parameter_count=info.parameter_count, vocab_size=info.vocab_size,
                   embedding_length=info.embedding_length, details=info.details)
    tensors = info.details["tensor_bytes"]
    assert tensors["tied"] and len(tensors["layers"]) == 30
    for details in (info.details, {k: v for k, v in info.details.items() if k != "tensor_bytes"}):
        row.details = details
        fp = footprint(row, 4096, kv_cache=8 * MiB)
        assert fp.max_gpu_layers == 31
        assert fp.split(0).ram == estimate(row, 4096, kv_cache=8 * MiB).total
        assert fp.split(0).vram == 0 and fp.split(31).vram > fp.split(30).vram > fp.split(1).vram > 0
    exact = footprint(row.__class__(size=row.size, parameter_count=row.parameter_count, vocab_size=row.vocab_size,
                                    embedding_length=row.embedding_length, details=info.details), 4096)
    assert exact.output == tensors["output"], "the GPU gets its own copy of the tied embeddings"


# -- how many layers ----------------------------------------------------------------------------


def test_a_model_that_fits_goes_whole_to_the_gpu() -> None:
    gpu = FakeGpu(free_mib=10_000)
    plan = plan_load(model(), -1, budgets(gpu=gpu), [])
    assert plan.gpu_layers == 11 and plan.fits and plan.evict == ()
    assert plan.need == model().split(11)


def test_a_model_that_does_not_fit_gets_fewer_layers_not_an_error() -> None:
    gpu = FakeGpu(free_mib=700)  # budget 630 MiB: overhead 100 + output 60 + compute 30 + 3 layers of 120
    plan = plan_load(model(), -1, budgets(gpu=gpu), [])
    assert plan.fits and plan.gpu_layers == 4
    assert plan.need.vram <= gpu.budget() < model().split(5).vram
    assert plan.need.ram == model().split(4).ram


def test_too_small_a_gpu_takes_no_layer() -> None:
    plan = plan_load(model(), -1, budgets(gpu=FakeGpu(free_mib=150)), [])
    assert plan.gpu_layers == 0 and plan.need.vram == 0 and plan.fits


@pytest.mark.parametrize(("wanted", "expected"), [(0, 0), (3, 3), (11, 11), (500, 11), (-1, 11)])
def test_num_gpu_bounds_the_layers(wanted: int, expected: int) -> None:
    assert plan_load(model(), wanted, budgets(gpu=FakeGpu(free_mib=10_000)), []).gpu_layers == expected


@pytest.mark.parametrize("wanted", [-1, 0, 5])
def test_without_a_gpu_nothing_is_offloaded(wanted: int) -> None:
    plan = plan_load(model(), wanted, budgets(), [])
    assert plan.gpu_layers == 0 and plan.need == model().split(0) and plan.fits


def test_layers_for_is_the_most_that_fit() -> None:
    fp = model()
    for room in range(0, 2000 * MiB, 37 * MiB):
        k = layers_for(fp, -1, room)
        assert k == 0 or fp.split(k).vram <= room
        assert k == fp.max_gpu_layers or fp.split(k + 1).vram > room


# -- evictions over both budgets ----------------------------------------------------------------


def test_gpu_memory_evicts_only_models_on_the_gpu_least_recent_first() -> None:
    """The new model needs the GPU: idle models are evicted least recently used first, but a
    CPU-only one frees no GPU memory, so it stays however old it is."""
    gpu = FakeGpu(free_mib=2_000)  # budget 1800 MiB; the new model takes 1590 of it whole
    residents = [resident("cpu-old", 500, 0, last_used=1), resident("gpu-a", 100, 600, last_used=2),
                 resident("gpu-b", 100, 600, last_used=3)]
    plan = plan_load(model(), -1, budgets(gpu=gpu, instances=9), residents)
    assert plan.gpu_layers == 11 and plan.fits
    assert plan.evict == ("gpu-a", "gpu-b")


def test_ram_evicts_the_least_recent_model_that_holds_ram() -> None:
    fp = model()
    need = fp.split(0).ram // MiB
    residents = [resident("gpu-only", 0, 500, last_used=1), resident("old", 400, 0, last_used=2),
                 resident("new", 400, 0, last_used=3)]
    plan = plan_load(fp, 0, budgets(ram_mib=need + 500, instances=9), residents)
    assert plan.fits and plan.evict == ("old",)


def test_models_in_use_are_never_evicted_and_shrink_the_offload() -> None:
    """A busy model's GPU memory is not waited for: the new model gets the layers that fit
    beside it (and waits only for RAM, which is all it can use)."""
    gpu = FakeGpu(free_mib=2_000)
    busy = resident("busy", 100, 1_200, idle=False)
    plan = plan_load(model(), -1, budgets(gpu=gpu), [busy])
    assert "busy" not in plan.evict and plan.fits
    assert plan.need.vram <= gpu.budget() - 1_200 * MiB
    assert 0 < plan.gpu_layers < 11

    tight = plan_load(model(), -1, budgets(ram_mib=500, gpu=gpu), [resident("busy", 400, 1_200, idle=False)])
    assert not tight.fits and tight.evict == () and tight.short.ram > 0 and tight.short.vram == 0


def test_the_instance_limit_evicts_the_least_recent_whatever_it_holds() -> None:
    residents = [resident("b", 10, 0, last_used=2), resident("a", 10, 0, last_used=1)]
    plan = plan_load(model(), -1, budgets(gpu=FakeGpu(free_mib=10_000), instances=2), residents)
    assert plan.evict == ("a",) and plan.fits


def test_an_idle_gpu_model_leaves_rather_than_the_new_one_getting_fewer_layers() -> None:
    """As Ollama does: a model that fits whole once idle models leave is loaded whole."""
    gpu = FakeGpu(free_mib=2_000)
    plan = plan_load(model(), -1, budgets(gpu=gpu), [resident("idle", 100, 1_200)])
    assert plan.gpu_layers == 11 and plan.evict == ("idle",)
