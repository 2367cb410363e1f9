"""The prefix cache across requests (runtime/engine/kvcache.py, kvstate.py) on the real test
models: llama.cpp's sequence states cut into token spans and joined again give back exactly the
KV a sequence held (SmolLM2, and Gemma 3 with its sliding-window second cache), and the engine
with more conversations than slots evaluates only each turn's new tokens, with the same output
as without the cache."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from myllm.runtime.engine.batching import BatchEngine
from myllm.runtime.engine.kvcache import KVCache, common_prefix
from myllm.runtime.engine.kvstate import Cells, parse
from myllm.runtime.engine_types import DoneEvent, GenerationRequest, LoadSpec
from myllm.runtime.request.options import GenerationOptions
from tests.test_engine import run

GREEDY = GenerationOptions(temperature=0, max_tokens=6)
SHARED = "You are a careful agent. Rule: read files before you edit them, and run the tests after. " * 32


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def engine(request: pytest.FixtureRequest, smollm2_path: Path, gemma3_path: Path) -> BatchEngine:
    """Four slots, no cache of its own: the tests drive a `KVCache` on its context while it is
    idle (its scheduler thread waits for work, so nothing else touches llama.cpp)."""
    path = smollm2_path if request.param == "smollm2" else gemma3_path
    engine = BatchEngine(LoadSpec(request.param, path, 2048, n_parallel=4), n_threads=2, kv_cache_bytes=0)
    yield engine
    engine.close()


def state_of(engine: BatchEngine, seq: int) -> tuple[Cells, ...]:
    lib, ctx = engine._lib, engine.ctx.ctx
    size = lib.llama_state_seq_get_size(ctx, seq)
    data = np.empty(size, np.uint8)
    written = lib.llama_state_seq_get_data(ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, seq)
    return parse(data[:written]).cells


def same_kv(a: tuple[Cells, ...], b: tuple[Cells, ...]) -> bool:
    """The same positions with the same K and V bytes in every cache (the records' sequence ids differ)."""
    def ordered(c: Cells) -> Cells:
        return c.select(int(c.pos.min()), int(c.pos.max()) + 1)
    return len(a) == len(b) and all(
        np.array_equal(x.pos, y.pos) and all(np.array_equal(p, q) for p, q in zip(x.k + x.v, y.k + y.v))
        for x, y in ((ordered(x), ordered(y)) for x, y in zip(a, b)))


def slot_of(engine: BatchEngine, tokens: list[int]) -> int:
    """The sequence holding the longest prefix of `tokens`."""
    return max(engine._slots, key=lambda s: common_prefix(s.cached, tokens)).seq


def test_spans_joined_give_back_the_same_kv(engine: BatchEngine) -> None:
    """Two conversations share a long prefix: the second one's stored part is only its own
    tail, and each restored into another sequence holds exactly the KV it was saved from,
    including a sliding-window cache's last window (Gemma 3's is 512 positions)."""
    one = engine.tokenize(SHARED + "Task one: fix the parser.")
    two = engine.tokenize(SHARED + "Task two: speed up the loader, which is slow on big files.")
    assert len(one) > 600  # past Gemma's window
    cache = KVCache(1 << 30, n_swa=engine._lib.llama_model_n_swa(engine._loaded.model.model))
    lib, ctx = engine._lib, engine.ctx.ctx
    held, states, sizes = [], [], []
    for tokens in (one, two):  # the second may take the first one's sequence: each is saved at once
        run(engine, GenerationRequest(tokens, GenerationOptions(temperature=0, max_tokens=1)))
        seq = slot_of(engine, tokens)
        held.append(list(engine._slots[seq].cached))
        states.append(state_of(engine, seq))
        cache.save(lib, ctx, held[-1], seq)
        sizes.append(cache.bytes)
    shared = common_prefix(held[0], held[1])
    assert shared > 600
    assert sizes[1] - sizes[0] < sizes[0] * (len(held[1]) - shared + 8) / len(held[0]), "the shared prefix is stored once"
    assert len(cache) == 3  # the shared prefix, then each one's tail
    spare = 3
    for tokens, state in zip(held, states):
        found = cache.match(tokens)
        assert found.length == len(tokens)
        assert cache.restore(lib, ctx, found, spare)
        assert same_kv(state_of(engine, spare), state)
    engine._slots[spare].cached = list(held[1])  # what the spare sequence now holds


def test_a_restored_prefix_continues_like_the_original(engine: BatchEngine) -> None:
    """Part of a stored path, cut inside a span, restored and continued: the next tokens are
    the ones the sequence it came from gives. A sliding-window cache saves only the last window
    of positions, which does not reach back far enough for an earlier cut: there the cache
    finds nothing rather than restore a window with a hole."""
    prompt = engine.tokenize(SHARED + "Now write the plan in three steps.")
    reference = run(engine, GenerationRequest(prompt, GREEDY))[-1]
    seq = slot_of(engine, prompt)
    cache = KVCache(1 << 30, n_swa=engine._lib.llama_model_n_swa(engine._loaded.model.model))
    cache.save(engine._lib, engine.ctx.ctx, engine._slots[seq].cached, seq)
    cut = len(prompt) - 5
    found = cache.match(prompt[:cut])
    if cache.n_swa:
        assert found.length == 0
        return
    assert found.length == cut
    spare = (seq + 1) % 4
    assert cache.restore(engine._lib, engine.ctx.ctx, found, spare)
    engine._slots[spare].cached = list(prompt[:cut])
    for slot in engine._slots:  # only the restored sequence can serve the prompt
        if slot.seq != spare:
            engine.ctx.kv_cache_seq_rm(slot.seq, 0, -1)
            slot.cached = []
    again = run(engine, GenerationRequest(prompt, GREEDY))[-1]
    assert isinstance(again, DoneEvent) and again.prompt_eval_tokens == 5
    assert again.text == reference.text


def turns(path: Path, kv_cache_bytes: int, agents: int = 6, rounds: int = 3) -> list[list[DoneEvent]]:
    """`agents` conversations behind one shared prefix, taking turns over 4 slots."""
    engine = BatchEngine(LoadSpec("m", path, 2048, n_parallel=4), n_threads=2, kv_cache_bytes=kv_cache_bytes)
    try:
        histories = [engine.tokenize(SHARED + f"Agent {a}: fix test {a}.") for a in range(agents)]
        out = []
        for t in range(rounds):
            dones = []
            for a in range(agents):
                events = run(engine, GenerationRequest(histories[a], GREEDY))
                dones.append(events[-1])
                generated = [e.token_id for e in events[:-1] if e.token_id >= 0]
                histories[a] = histories[a] + generated + engine.tokenize(f" Step {t} of agent {a} is done.")
            out.append(dones)
        return out
    finally:
        engine.close()


def test_agents_over_fewer_slots_evaluate_only_their_new_tokens(smollm2_path: Path, gemma3_path: Path) -> None:
    """Six conversations over four slots: from the second turn on every prompt evaluates
    only what its conversation added (the last answer's final token and the new message), and
    the answers are the ones the model gives without the cache (SmolLM2, whose greedy output
    does not change with how a prompt was split into batches)."""
    smollm2, gemma3 = turns(smollm2_path, 256 << 20), turns(gemma3_path, 256 << 20)
    for result in (smollm2, gemma3):
        for later in result[1:]:
            assert all(done.prompt_eval_tokens <= 12 for done in later), [d.prompt_eval_tokens for d in later]
    cold = turns(smollm2_path, 0)
    # Without it, the agents whose sequence another took evaluate their own history again
    # (the shared prefix still comes from whichever sequence holds it): 39 tokens each against
    # 11 here, with six agents taking turns over four sequences.
    assert max(d.prompt_eval_tokens for d in cold[2]) > 12
    assert sum(d.prompt_eval_tokens for d in cold[2]) > 2 * sum(d.prompt_eval_tokens for d in smollm2[2])
    assert [d.text for t in smollm2 for d in t] == [d.text for t in cold for d in t]
