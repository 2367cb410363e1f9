"""How the engine shapes its batches for llama.cpp's micro-batches (runtime/engine/microbatch.py):
short prompts behind a long cached conversation evaluate a whole CPU attention tile, and a new
request keeps the busy sequences one consecutive run. Unit tests of the pure rules first, then
SmolLM2 through the engine."""

from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from myllm.registry.schema import ModelRow
from myllm.runtime.engine.batching import BatchEngine, place
from myllm.runtime.engine.kvcache import KVCache, common_prefix
from myllm.runtime.engine.kvstate import parse
from myllm.runtime.engine.microbatch import (
    CLIFF_CONTEXT,
    CLIFF_MIN,
    ROWS,
    TILE_ROWS,
    CpuAttention,
    contiguous,
    measure_cliff,
)
from myllm.runtime.engine.slots import Slot
from myllm.runtime.engine_types import DoneEvent, GenerationRequest, LoadSpec
from myllm.runtime.request.options import GenerationOptions
from myllm.runtime.runner.protocol import RunnerConfig
from myllm.settings import Settings
from tests.test_engine import run

SMOLLM2 = CpuAttention.for_model(134_515_008, 30, 576)
"""SmolLM2-135M's shape (llama_model_n_params, _n_layer, _n_embd)."""


def test_the_balance_follows_the_model_shape() -> None:
    """SmolLM2's shape gives the balance measured for it (282 tokens); a model with more
    weights per attention dimension (Llama 2 7B's shape) needs a longer context to pad."""
    assert 270 < SMOLLM2.balance < 295
    llama7b = CpuAttention.for_model(6_738_415_616, 32, 4096)
    assert llama7b.balance > 5 * SMOLLM2.balance
    assert SMOLLM2.worth_padding(30, 2000) and not llama7b.worth_padding(30, 2000)


@pytest.mark.parametrize(("rows", "context", "padded"), [
    (63, 0, False),    # nothing cached: 64 rows cost as much as 63 (162 against 178 ms)
    (30, 100, False),  # a short conversation: per-row attention is still cheap
    (30, 2000, True),  # an agent's turn behind its history: 1,458 ms for 63 rows against 320 for 64
    (14, 3500, True),
    (4, 3500, False),
])
def test_padding_pays_only_where_the_per_row_path_costs_more(rows: int, context: int, padded: bool) -> None:
    assert SMOLLM2.worth_padding(rows, context) is padded
    start = SMOLLM2.start(context, context + rows)
    assert start == (context + rows - ROWS if padded else context)


class FakeLlamaForShape:
    """A fake of the three llama.cpp calls `CpuAttention.on_cpu` reads a model's shape with
    (pure logic: whether the measured cliff decides)."""

    @staticmethod
    def llama_model_n_params(model: object) -> int:
        return 134_515_008

    @staticmethod
    def llama_model_n_layer(model: object) -> int:
        return 30

    @staticmethod
    def llama_model_n_embd(model: object) -> int:
        return 576

    @staticmethod
    def llama_supports_gpu_offload() -> bool:
        return False


@pytest.mark.parametrize(("ratio", "pads"), [(1.1, False), (CLIFF_MIN, True), (4.6, True)])
def test_padding_only_on_a_cpu_with_the_cliff(ratio: float, pads: bool) -> None:
    """A per-row row measured at about the cost of a tiled one (1.1 on an AMD EPYC) means no
    padding; a costlier one (4.6 behind 2,048 cells on the AMX CPU) means SmolLM2's model. With
    flash attention off nothing is measured."""
    measured: list[float] = []

    def cliff() -> float:
        measured.append(ratio)
        return ratio

    attention = CpuAttention.on_cpu(FakeLlamaForShape, None, 0, "auto", cliff)
    assert (attention == SMOLLM2) is pads and (attention is None) is not pads
    assert CpuAttention.on_cpu(FakeLlamaForShape, None, 0, "off", cliff) is None and len(measured) == 1


def test_padding_needs_tokens_to_evaluate_again_and_a_short_prompt() -> None:
    assert SMOLLM2.start(2000, 2100) == 2000  # already a tile's worth
    assert SMOLLM2.start(30, 60) == 30  # fewer tokens in all than a tile


def test_a_prompt_chunk_leaves_no_short_piece() -> None:
    assert CpuAttention.take(530, 509) == 465  # 465 now, a whole tile next step, not 509 and 21
    assert CpuAttention.take(2000, 509) == 509
    assert CpuAttention.take(40, 509) == 40
    assert CpuAttention.take(600, 509) == 509  # 91 left, more than a tile


def test_contiguous_runs() -> None:
    assert contiguous([]) and contiguous([2]) and contiguous([1, 0, 2])
    assert not contiguous([0, 2]) and not contiguous([3, 0])


def test_a_new_request_keeps_the_busy_sequences_consecutive() -> None:
    """Four slots holding unrelated conversations of one length, sequence 2 busy, sequence 0
    the least recently used: the least recently used slot would split the run (0 and 2 decode
    in two micro-batches), so the request goes to 3, the least recently used of 1 and 3.
    A cache that is off copies nothing, so no llama.cpp context is needed (pure logic)."""
    slots = [Slot(seq=i, cached=[100 + i] * 50, last_used=used) for i, used in enumerate((1.0, 3.0, 4.0, 2.0))]
    free = [s for s in slots if s.seq != 2]
    slot, keep = place(KVCache(0), None, None, [7] * 20, free, {2})
    assert (slot.seq, keep) == (3, 0)
    slot, _ = place(KVCache(0), None, None, [7] * 20, free, set())
    assert slot.seq == 0  # nothing busy: the least recently used


LONG = "The repository holds a parser, a loader and their tests; every change runs the suite. " * 80
TURN = " Tool output: 3 passed, 1 failed with AssertionError on line 42 of tests/test_parser.py. What next?"


@pytest.fixture(scope="module")
def engine(smollm2_path: Path) -> BatchEngine:
    """SmolLM2 as on a CPU with the cliff, whatever this one measured: the padding is what is tested."""
    engine = BatchEngine(LoadSpec("smollm2", smollm2_path, 4096, n_parallel=2), n_threads=2, kv_cache_bytes=0)
    engine.attention = SMOLLM2
    yield engine
    engine.close()


def answer(engine: BatchEngine, tokens: list[int]) -> DoneEvent:
    done = run(engine, GenerationRequest(tokens, GenerationOptions(temperature=0, max_tokens=8)))[-1]
    assert isinstance(done, DoneEvent)
    return done


def test_a_short_turn_behind_a_long_history_evaluates_a_tile(engine: BatchEngine) -> None:
    """The turn's ~25 new tokens behind ~1,500 cached ones: the engine evaluates the last
    `ROWS` tokens instead, and answers as it does when the whole prompt is evaluated."""
    history = engine.tokenize(LONG)
    assert len(history) > 1400
    answer(engine, history)
    prompt = engine.tokenize(LONG + TURN)
    assert 14 < len(prompt) - len(history) < ROWS
    padded = answer(engine, prompt)
    assert padded.prompt_eval_tokens == ROWS
    for slot in engine._slots:  # forget every cached prefix: the whole prompt evaluated
        engine.ctx.kv_cache_seq_rm(slot.seq, 0, -1)
        slot.cached = []
    whole = answer(engine, prompt)
    assert whole.prompt_eval_tokens == len(prompt) and whole.text == padded.text


def test_a_short_turn_behind_a_short_history_evaluates_only_itself(engine: BatchEngine) -> None:
    history = engine.tokenize("Fix the parser.")
    answer(engine, history)
    prompt = engine.tokenize("Fix the parser." + TURN)
    done = answer(engine, prompt)
    assert done.prompt_eval_tokens == len(prompt) - common_prefix(history, prompt) < ROWS


def v_transposed(engine: BatchEngine, seq: int) -> bool:
    """Whether llama.cpp keeps this context's V transposed: it does exactly when flash
    attention is off, which makes the setting visible in a sequence's saved state."""
    lib, ctx = engine._lib, engine.ctx.ctx
    size = lib.llama_state_seq_get_size(ctx, seq)
    data = np.empty(size, np.uint8)
    written = lib.llama_state_seq_get_data(ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, seq)
    return parse(data[:written]).layouts[0].v_trans


@pytest.mark.parametrize("flash_attention", ["off", "on"])
def test_the_flash_attention_setting_reaches_llama_cpp(smollm2_path: Path, flash_attention: str) -> None:
    """MYLLM_FLASH_ATTENTION goes from the daemon's settings into the load key and the runner's
    start message, and llama.cpp makes its context so. Without flash attention there is no tile
    to fill: a short turn behind a long history evaluates only itself."""
    settings = Settings(flash_attention=flash_attention)  # type: ignore[arg-type]
    row = ModelRow(name="smollm2:135m", digest="sha256:" + "0" * 64)
    spec = LoadSpec.for_model(row, smollm2_path, 4096, flash_attention=settings.flash_attention)
    assert RunnerConfig.decode(RunnerConfig(spec, 2, 0).encode()).spec == spec
    engine = BatchEngine(dataclasses.replace(spec, n_parallel=2), n_threads=2, kv_cache_bytes=0)
    try:
        history = engine.tokenize(LONG)
        answer(engine, history)
        assert v_transposed(engine, engine._slots[0].seq) is (flash_attention == "off")
        done = answer(engine, engine.tokenize(LONG + TURN))
        padding = engine.attention is not None
        assert not padding or flash_attention == "on"  # and on, only where the per-row path costs more
        assert (done.prompt_eval_tokens == ROWS) is padding
    finally:
        engine.close()


def test_the_cliff_is_measured_on_an_empty_sequence_and_left_empty(smollm2_path: Path) -> None:
    """`measure_cliff` on SmolLM2's context: a ratio of real timings, and sequence 0 as it
    found it (a prompt then answers exactly as on a context never measured on). No batch of
    the measurement is larger than the tiled rows it times (a larger one would make the runner
    hold more of llama.cpp's compute buffer than short prompts do)."""
    spec = LoadSpec("smollm2", smollm2_path, 1024, n_parallel=1, flash_attention="off")
    engine = BatchEngine(spec, n_threads=2, kv_cache_bytes=0)
    try:
        prompt = engine.tokenize(LONG[:600])
        before = answer(engine, prompt)
        engine.ctx.kv_cache_seq_rm(0, 0, -1)
        engine._slots[0].cached = []
        sizes: list[int] = []

        class Recording:
            """llama.cpp's bindings, with each decode's batch size noted."""

            def __getattr__(self, name: str) -> object:
                return getattr(engine._lib, name)

            def llama_decode(self, ctx: object, batch: object) -> int:
                sizes.append(batch.n_tokens)  # type: ignore[attr-defined]
                return engine._lib.llama_decode(ctx, batch)

        ratio = measure_cliff(Recording(), engine.ctx, engine.batch)
        assert 0.2 < ratio < 50
        assert max(sizes) == TILE_ROWS and sum(sizes[:CLIFF_CONTEXT // TILE_ROWS]) == CLIFF_CONTEXT
        after = answer(engine, prompt)
        assert after.prompt_eval_tokens == len(prompt) and after.text == before.text
    finally:
        engine.close()


def test_a_reload_takes_the_cliff_measured_before(smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load measures the cliff once and reports it (the runner's `ready`); a load given that
    figure (`RunnerConfig.attention_cliff`, what the daemon remembers per model) measures
    nothing and decides the padding from it, on either side of `CLIFF_MIN`."""
    spec = LoadSpec("smollm2", smollm2_path, 1024, n_parallel=1, flash_attention="on")
    first = BatchEngine(spec, n_threads=2, kv_cache_bytes=0)
    first.close()
    assert first.attention_cliff is not None and 0.2 < first.attention_cliff < 50

    def measuring(*_args: object) -> float:
        raise AssertionError("measured again")

    monkeypatch.setattr("myllm.runtime.engine.batching.measure_cliff", measuring)
    for given, pads in ((1.0, False), (CLIFF_MIN + 1, True)):
        config = RunnerConfig.decode(RunnerConfig(spec, 2, 0, attention_cliff=given).encode())
        engine = BatchEngine(config.spec, n_threads=2, kv_cache_bytes=0, attention_cliff=config.attention_cliff)
        engine.close()
        assert engine.attention_cliff == given and (engine.attention is not None) is pads
    off = BatchEngine(dataclasses.replace(spec, flash_attention="off"), n_threads=2, kv_cache_bytes=0, attention_cliff=3.0)
    off.close()
    assert off.attention is None and off.attention_cliff is None  # no flash attention: no cliff to report
