"""A grammar's redraw (runtime/engine/grammar_scan.py) leaves the sampler chain exactly the
candidates it keeps when the grammar is applied to the whole vocabulary (as llama-server does),
on Gemma 3's real logits in every state of a JSON reply, for each kind of truncation; and where
most tokens fit, it checks a small part of the 262k-token vocabulary instead of all of it."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from myllm.runtime.engine import grammar_scan
from myllm.runtime.engine.batching import BatchEngine
from myllm.runtime.engine.grammar_scan import GrammarScan, Truncation
from myllm.runtime.engine.sampling import Candidates
from myllm.runtime.engine.slots import logits_row
from myllm.runtime.engine_types import LoadSpec
from myllm.runtime.request.grammar import format_grammar
from myllm.runtime.request.options import GenerationOptions
from myllm.runtime.request.schema_size import SchemaLimits
from tests.engine_calls import decode

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "lines": {"type": "integer"}},
          "required": ["title", "lines"]}
REPLY = '{"title": "Rain on the old roof tonight", "lines": 12}'
TRUNCATIONS = {
    "default": Truncation(40, 0.95, 0.05, 0.8),
    "top-k": Truncation(5, 1.0, 0.0, 1.0),
    "min-p": Truncation(0, 1.0, 0.05, 1.5),
    "top-p": Truncation(0, 0.9, 0.0, 1.0),
    "greedy": Truncation(0, 1.0, 0.0, 0.0),
}


@pytest.fixture(scope="module")
def engine(gemma3_path: Path) -> Iterator[BatchEngine]:
    eng = BatchEngine(LoadSpec("gemma3", gemma3_path, 256), 2, 0)
    yield eng
    eng.close()


def states(engine: BatchEngine) -> Iterator[tuple[np.ndarray, object]]:
    """For each token of `REPLY`: the model's logits before it and a grammar that has accepted
    the reply up to there (fed the reply's own tokens; the reply fits the schema)."""
    grammar_text = format_grammar(GenerationOptions(format=SCHEMA), SchemaLimits(grammar=65536, depth=64, nodes=65536))
    assert grammar_text is not None
    lib = engine._lib
    grammar = engine.samplers.grammar(grammar_text)
    prompt = engine.tokenize("Write a JSON object about a poem:")
    reply = engine.vocabulary.markup(REPLY)
    batch = engine.batch.batch
    engine.ctx.kv_cache_seq_rm(0, 0, -1)
    try:
        pos = 0
        for chunk in [prompt, *[[t] for t in reply]]:
            decode(engine, chunk, pos)
            pos += len(chunk)
            if len(chunk) == 1:
                lib.llama_sampler_accept(grammar, chunk[0])
            yield logits_row(lib, engine.ctx.ctx, batch.n_tokens - 1, engine.n_vocab).copy(), grammar
    finally:
        lib.llama_sampler_free(grammar)


def kept(engine: BatchEngine, ids: np.ndarray, logits: np.ndarray, t: Truncation) -> list[int]:
    """What llama.cpp's top-k, top-p and min-p keep of the candidates `ids` (a greedy chain:
    its pick), as the chain applies them before its temperature and draw."""
    from llama_cpp import _internals as internals

    candidates = Candidates(engine._lib, engine.n_vocab)
    candidates.subset(ids, logits)
    chain = internals.LlamaSampler()
    if t.temperature == 0:
        chain.add_greedy()
    else:
        chain.add_top_k(t.top_k)
        chain.add_top_p(t.top_p, 1)
        chain.add_min_p(t.min_p, 1)
    try:
        engine._lib.llama_sampler_apply(chain.sampler, candidates.pointer())
        array = candidates.array
        if t.temperature == 0:
            return [candidates.selected()]
        return sorted(array.data[i].id for i in range(array.size) if math.isfinite(array.data[i].logit))
    finally:
        chain.close()


def whole_pass(engine: BatchEngine, grammar: object, logits: np.ndarray) -> np.ndarray:
    """The logits with the grammar applied to every token (-inf where it does not fit)."""
    candidates = Candidates(engine._lib, engine.n_vocab)
    data = candidates.subset(np.arange(engine.n_vocab, dtype=np.intc), logits)
    engine._lib.llama_sampler_apply(grammar, candidates.pointer())
    return data["logit"].copy()


def test_the_chain_keeps_what_it_keeps_after_a_whole_vocabulary_pass(engine: BatchEngine,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[int] = []
    fits = GrammarScan._fits
    monkeypatch.setattr(GrammarScan, "_fits", lambda self, ids: checked.append(len(ids)) or fits(self, ids))
    small = 0
    n_states = 0
    for logits, grammar in states(engine):
        n_states += 1
        constrained = whole_pass(engine, grammar, logits)
        fitting = np.flatnonzero(np.isfinite(constrained)).astype(np.intc)
        fitting = fitting[np.lexsort((fitting, -logits[fitting]))]  # best first, as found: top-p sums in order
        for name, t in TRUNCATIONS.items():
            if t.untruncated:
                continue
            checked.clear()
            scan = GrammarScan(engine._lib, engine.samplers._candidates, grammar, t, seed=1)
            found = scan.fitting(logits)
            assert set(found) <= set(fitting), name  # every token found fits
            assert kept(engine, found, logits[found], t) == kept(engine, fitting, logits[fitting], t), name
            if len(fitting) > engine.n_vocab // 2 and t.top_p >= 1:
                assert sum(checked) <= grammar_scan.FIRST_CHUNK + grammar_scan.SECOND_CHUNK, (name, checked)
                small += 1
            if name == "top-p":  # no top-k: every fitting token's mass counts
                assert sum(checked) == engine.n_vocab
    assert n_states > 10 and small > 0  # the title's string is where most tokens fit


def test_with_no_truncation_a_fitting_draw_has_the_constrained_distribution(engine: BatchEngine) -> None:
    """Inside the title's string (most tokens fit), 4,000 redraws at temperature 1 with nothing
    truncated: every token fits, and the most likely one comes as often as its probability
    among the fitting tokens says (within four standard deviations)."""
    t = Truncation(0, 1.0, 0.0, 1.0)
    for i, (logits, grammar) in enumerate(states(engine)):
        if i < 4:  # the reply's opening `{"title": "`
            continue
        constrained = whole_pass(engine, grammar, logits)
        scan = GrammarScan(engine._lib, engine.samplers._candidates, grammar, t, seed=7)
        draws = np.array([scan.fitting(logits) for _ in range(4000)])
        assert draws.shape == (4000, 1)  # each a single drawn token, not a scan
        assert np.isfinite(constrained[draws]).all()
        p = np.exp(constrained - constrained.max())
        p /= p.sum()
        top = int(np.argmax(p))
        frequency = float(np.mean(draws == top))
        assert abs(frequency - p[top]) < 4 * math.sqrt(p[top] * (1 - p[top]) / 4000), (frequency, p[top])
        break
