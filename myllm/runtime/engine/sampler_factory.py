"""Making each request's sampler (runtime/engine/sampling.py) from its options, and checking a
format's grammar before its request starts."""

from __future__ import annotations

import ctypes
import json
import random
import re
import time
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from myllm.errors import InvalidOptions
from myllm.runtime.engine.grammar_scan import GrammarScan, Truncation
from myllm.runtime.engine.lifetime import UseGuard
from myllm.runtime.engine.sampling import Candidates, ChainSampler, GreedySampler
from myllm.runtime.engine.vocabulary import Vocabulary
from myllm.runtime.engine_types import GenerationRequest, Thinking

if TYPE_CHECKING:
    from llama_cpp import llama_sampler_p

PENALTY_WINDOW = 64
FIRST_TOKEN_SHARE = 0.5
"""The share of the per-token limit (MYLLM_GRAMMAR_TOKEN_MS) a format's first token may cost when
checked before its request starts (a 500-value `enum` costs ~50 ms with SmolLM2's 49k-token
vocabulary, ~0.1 ms a value). Sampling runs on the scheduler thread for every sequence in turn,
so a grammar's cost is every other request's wait. Measured as the thread's CPU time: wall time
grows with the machine's load, and under load made the same schema a 400 one time in a few."""


THINKING_ROOT = "thinking-root"
"""The start symbol of a format's grammar that begins after a reasoning section."""


class SamplerFactory:
    def __init__(self, lib: ModuleType, vocabulary: Vocabulary, guard: UseGuard, grammar_seconds: float) -> None:
        """`guard`: the engine's, since a grammar is compiled (and checked) on callers' threads
        too; `grammar_seconds`: the CPU time a grammar may take for one token. The candidates
        made here are the scheduler's: every `ChainSampler` it samples with shares them."""
        self._first_token_limit = grammar_seconds * FIRST_TOKEN_SHARE
        self._lib = lib
        self._vocab = vocabulary.pointer
        self._n_vocab = vocabulary.n_vocab
        self._guard = guard
        self._candidates = Candidates(lib, self._n_vocab)

    def for_request(self, req: GenerationRequest) -> GreedySampler | ChainSampler:
        """A new sampler for `req`, its own: a `ChainSampler` must be closed when the request ends."""
        from llama_cpp import _internals as internals

        o = req.options
        if o.temperature == 0 and not req.grammar:
            return GreedySampler(PENALTY_WINDOW, o.repeat_penalty, o.frequency_penalty, o.presence_penalty)
        grammar = self.grammar(req.grammar, req.thinking) if req.grammar else None  # first: it may fail
        seed = o.seed if o.seed is not None else random.randrange(2**32)
        penalties = internals.LlamaSampler()
        penalties.add_penalties(self._n_vocab, PENALTY_WINDOW, o.repeat_penalty, o.frequency_penalty, o.presence_penalty)
        chain = internals.LlamaSampler()
        if o.temperature == 0:
            chain.add_greedy()
        else:
            chain.add_top_k(o.top_k)
            chain.add_top_p(o.top_p, 1)
            chain.add_min_p(o.min_p, 1)
            chain.add_temp(o.temperature)
            chain.add_dist(seed)
        truncation = Truncation(o.top_k, o.top_p, o.min_p, o.temperature)
        scan = GrammarScan(self._lib, self._candidates, grammar, truncation, seed) if grammar else None
        return ChainSampler(self._lib, self._candidates, penalties, chain, scan)

    def grammar(self, grammar: str, thinking: Thinking | None = None) -> llama_sampler_p:
        """llama.cpp's grammar sampler for `grammar`. llama.cpp answers a grammar it cannot
        parse with NULL (and a log line), and a NULL in a sampler chain crashes the process, so
        that is a clear error here instead.

        With `thinking` the grammar holds on the answer only: a lazy grammar, which lets every
        token through until its trigger, the reasoning section's closing marker (or, when the
        prompt did not open the section, an answer that starts without one), and from there
        takes the closing markup (`</think>` and a blank line; gpt-oss's `<|end|>` and its final
        message's header, so a gpt-oss model answers in its final channel) before the format's
        own `root`."""
        try:
            text = grammar.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidOptions("the output format contains a lone surrogate, which is not text", field="format") from exc
        with self._guard.use():
            if thinking is None:
                pointer = self._lib.llama_sampler_init_grammar(self._vocab, text, b"root")
            else:
                closing = json.dumps(thinking.closing.rstrip())
                start = f"\n{THINKING_ROOT} ::= {closing}? [ \\t\\n]* root\n".encode()
                triggers = [re.escape(thinking.close)] + ([] if thinking.started else [r"^\s*[^<\s]"])
                patterns = (ctypes.c_char_p * len(triggers))(*(t.encode() for t in triggers))
                pointer = self._lib.llama_sampler_init_grammar_lazy_patterns(
                    self._vocab, text + start, THINKING_ROOT.encode(), patterns, len(triggers), None, 0)
        if not pointer:
            raise InvalidOptions("llama.cpp could not compile the grammar of the requested output format", field="format")
        return pointer

    def check_grammar(self, grammar: str) -> None:
        """Raise `InvalidOptions` unless llama.cpp can compile `grammar` and applying it to
        the vocabulary once stays within `FIRST_TOKEN_SHARE` of the limit (a request's format is checked
        before its stream starts, so a bad one is a 400, not an error event). The whole
        vocabulary is what a token costs at worst when the grammar rejects the chain's first
        pick (`GrammarScan` checks less where most tokens fit), and the first token of a format
        is often such a token. Runs on the caller's thread: its candidates are its own, not
        the scheduler's."""
        pointer = self.grammar(grammar)
        try:
            candidates = Candidates(self._lib, self._n_vocab)  # kept: it owns the array's memory
            array = candidates.fill(np.zeros(self._n_vocab, dtype=np.single))
            started = time.thread_time()  # CPU time: a busy machine must not make a grammar cost more
            with self._guard.use():
                self._lib.llama_sampler_apply(pointer, array)
            cost = time.thread_time() - started
        finally:
            self._lib.llama_sampler_free(pointer)
        if cost > self._first_token_limit:
            raise InvalidOptions(
                f"the output format's grammar costs {cost * 1000:.0f} ms a token on this model (the limit is "
                f"{self._first_token_limit * 1000:.0f} ms); use a smaller schema (fewer enum values or alternatives)",
                field="format",
            )
