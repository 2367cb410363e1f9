"""The batch engine's samplers pick what llama.cpp's own chains pick, on the real model's
logits, step after step (each choice feeds the next step and the penalties): the greedy sampler
as penalties + greedy, and a grammar checked after the chain (as llama-server does) as the
grammar applied to every candidate first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from myllm.runtime.engine.batching import BatchEngine
from myllm.runtime.engine.sampler_factory import PENALTY_WINDOW
from myllm.runtime.engine.sampling import ChainSampler, GreedySampler
from myllm.runtime.engine.slots import logits_row
from myllm.runtime.engine_types import GenerationRequest, LoadSpec
from myllm.runtime.request.grammar import format_grammar
from myllm.runtime.request.options import GenerationOptions
from myllm.runtime.request.schema_size import SchemaLimits
from tests.engine_calls import decode

PENALTIES = [(1.0, 0.0, 0.0), (1.1, 0.0, 0.0), (1.5, 0.3, 0.6), (0.8, -0.2, 0.0)]


@pytest.fixture(scope="module")
def engine(smollm2_path: Path) -> BatchEngine:
    eng = BatchEngine(LoadSpec("smollm2", smollm2_path, 512, n_parallel=2), 2, 0)
    yield eng
    eng.close()


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
        mine = ours.sample(logits_row(engine._lib, engine.ctx.ctx, index, engine.n_vocab))
        theirs = reference.sample(engine.ctx, index)
        assert mine == theirs, (picked, mine, theirs)
        picked.append(mine)
        decode(engine, [mine], pos)
        pos += 1
    if repeat > 1:
        assert len(set(picked)) > 3  # the penalties broke the echo, so they had work to do


@pytest.mark.parametrize("repeat", [1.0, 1.3])
def test_grammar_checked_after_the_chain_picks_what_grammar_first_picks(engine: BatchEngine, repeat: float) -> None:
    """Greedily, checking only the chain's pick against the grammar (and applying the grammar to
    every candidate only when it rejects that pick) chooses exactly what applying it first does."""
    from llama_cpp import _internals as internals

    schema = {"type": "object", "properties": {"poem": {"type": "string"}, "lines": {"type": "integer"}},
              "required": ["poem", "lines"]}
    grammar = format_grammar(GenerationOptions(format=schema), SchemaLimits(grammar=65536, depth=64, nodes=65536))
    assert grammar is not None
    reference = internals.LlamaSampler()
    reference.add_penalties(engine.n_vocab, PENALTY_WINDOW, repeat, 0.0, 0.0)
    engine._lib.llama_sampler_chain_add(reference.sampler, engine.samplers.grammar(grammar))
    reference.add_greedy()
    options = GenerationOptions(temperature=0, repeat_penalty=repeat)
    ours = engine.samplers.for_request(GenerationRequest([], options, (), grammar))
    assert isinstance(ours, ChainSampler)
    prompt = engine.tokenize("Write the word 'echo' many times: echo echo echo")
    engine.ctx.kv_cache_seq_rm(0, 0, -1)
    decode(engine, prompt, 0)
    pos, picked, rejected = len(prompt), [], 0
    try:
        for _ in range(64):
            index = engine.batch.batch.n_tokens - 1
            logits = logits_row(engine._lib, engine.ctx.ctx, index, engine.n_vocab)
            unconstrained = int(np.argmax(logits))
            mine = ours.sample(logits)
            theirs = reference.sample(engine.ctx, index)
            assert mine == theirs, (picked, mine, theirs)
            if engine._lib.llama_vocab_is_eog(engine._vocab, mine):
                break
            rejected += mine != unconstrained
            picked.append(mine)
            decode(engine, [mine], pos)
            pos += 1
    finally:
        ours.close()
        reference.close()
    assert rejected > 0  # the model would rather have written something else: the grammar had work
    assert engine.detokenize(picked).startswith("{")
