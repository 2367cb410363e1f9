"""The batch engine's greedy sampler picks what llama.cpp's penalties + greedy chain picks, on
the real model's logits, step after step (each choice feeds the next step and the penalties)."""

from __future__ import annotations

from pathlib import Path

import pytest

from myllm.runtime.batching import PENALTY_WINDOW, BatchEngine
from myllm.runtime.engine import LoadSpec
from myllm.runtime.sampling import GreedySampler

PENALTIES = [(1.0, 0.0, 0.0), (1.1, 0.0, 0.0), (1.5, 0.3, 0.6), (0.8, -0.2, 0.0)]


@pytest.fixture(scope="module")
def engine(smollm2_path: Path) -> BatchEngine:
    eng = BatchEngine(LoadSpec("smollm2", smollm2_path, 512, n_parallel=2), 2, 0)
    yield eng
    eng.close()


def decode(eng: BatchEngine, tokens: list[int], start: int) -> None:
    batch = eng.batch.batch
    batch.n_tokens = 0
    for i, token in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, start + i, 1, False
        batch.seq_id[i][0] = 0
        batch.n_tokens += 1
    batch.logits[batch.n_tokens - 1] = True
    eng.ctx.decode(eng.batch)


@pytest.mark.parametrize("repeat,frequency,presence", PENALTIES)
def test_greedy_sampler_matches_llama_cpp(engine: BatchEngine, repeat: float, frequency: float, presence: float) -> None:
    from llama_cpp import _internals as internals

    reference = internals.LlamaSampler()
    reference.add_penalties(engine.n_vocab, PENALTY_WINDOW, repeat, frequency, presence)
    reference.add_greedy()
    ours = GreedySampler(PENALTY_WINDOW, repeat, frequency, presence)
    prompt = engine.tokenize("Write the word 'echo' many times: echo echo echo")
    engine.ctx.kv_cache_seq_rm(0, 0, -1)
    decode(engine, prompt, 0)
    pos, picked = len(prompt), []
    for _ in range(96):  # longer than the penalty window, so tokens also leave it
        index = engine.batch.batch.n_tokens - 1
        mine = ours.sample(engine._logits(index))
        theirs = reference.sample(engine.ctx, index)
        assert mine == theirs, (picked, mine, theirs)
        picked.append(mine)
        decode(engine, [mine], pos)
        pos += 1
    if repeat > 1:
        assert len(set(picked)) > 3  # the penalties broke the echo, so they had work to do
