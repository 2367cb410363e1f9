"""Picking each next token from one row of logits.

`GreedySampler`: greedy decoding (temperature 0, no grammar), computed as llama.cpp's
penalties + greedy sampler chain computes it. llama.cpp's `llama_sampler_sample` first copies
the whole vocabulary into a candidate array and looks every candidate up in the penalty counts:
~0.2 ms a token for a 49k vocabulary, most of a batch step's time outside `llama_decode`. Here
only the (at most `last_n`) penalized logits are touched and one argmax picks the token.

`ChainSampler`: everything else (a temperature, a grammar), with llama.cpp's samplers, the
grammar checked as llama-server checks it (see there).
"""

from __future__ import annotations

import ctypes
import math
from collections import deque
from typing import Any

import numpy as np

from myllm.errors import InvalidOptions
from myllm.runtime.engine.grammar_scan import GrammarScan

TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
"""llama.cpp's `llama_token_data` as a numpy record (int32 id, float logit, float p)."""


class GreedySampler:
    def __init__(self, last_n: int, repeat: float, frequency: float, presence: float) -> None:
        self.window: deque[int] = deque(maxlen=max(last_n, 1))
        """The last `last_n` accepted (generated) tokens: the penalties' memory, as llama.cpp keeps it."""
        self.counts: dict[int, int] = {}
        """How often each token is in `window`, kept as tokens come and go (not counted anew
        every token)."""
        self.repeat = np.float32(repeat)
        self.frequency = np.float32(frequency)
        self.presence = np.float32(presence)
        self.disabled = last_n == 0 or (repeat == 1 and frequency == 0 and presence == 0)

    def sample(self, logits: np.ndarray) -> int:
        """The token, which is also accepted into the penalty window. Ties go to the lowest id,
        as llama.cpp's greedy sampler breaks them. The penalized logits are written into the
        row for the argmax and put back after it: copying the whole row (196 KB for a 49k
        vocabulary) cost more than the rest of a token's sampling."""
        if self.disabled or not self.counts:
            token = int(np.argmax(logits))
        else:
            ids = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
            seen = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
            raw = logits[ids]
            penalized = np.where(raw <= 0, raw * self.repeat, raw / self.repeat)
            penalized -= seen * self.frequency + self.presence
            logits[ids] = penalized
            token = int(np.argmax(logits))
            logits[ids] = raw  # the row as the model wrote it, for log probabilities
        self.accept(token)
        return token

    def accept(self, token: int) -> None:
        """Remember a token of the output that was not sampled (one the engine wrote itself)."""
        if self.disabled:
            return
        if len(self.window) == self.window.maxlen:  # the oldest token leaves the window
            old = self.window[0]
            if self.counts[old] == 1:
                del self.counts[old]
            else:
                self.counts[old] -= 1
        self.window.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1


class Candidates:
    """A `llama_token_data_array` over the whole vocabulary, filled from a row of logits by
    numpy (no Python loop over 262k tokens). Samplers sort and truncate it in place, so every
    `fill` writes the ids again and resets its size. One user at a time: the scheduler thread
    has one for all its slots."""

    def __init__(self, lib: Any, n_vocab: int) -> None:
        self._lib = lib
        self._data = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.intc)
        self.array = lib.llama_token_data_array()

    def fill(self, logits: np.ndarray) -> Any:
        """The array holding `logits` as candidates, unsorted, nothing selected; a pointer for
        `llama_sampler_apply`, valid while this object lives (it owns the memory). The logits
        are copied, so llama.cpp's row is never written."""
        self.subset(self._ids, logits)
        return self.pointer()

    def subset(self, ids: np.ndarray, logits: np.ndarray | float = 0.0) -> np.ndarray:
        """The array holding only the tokens `ids` (with `logits`), unsorted, nothing selected;
        returns its records (a view, which samplers write in place: a grammar sets a rejected
        token's logit to -inf). `pointer()` passes it to llama.cpp."""
        data = self._data[:len(ids)]
        data["id"] = ids
        data["logit"] = logits
        data["p"] = 0
        array = self.array
        array.data = self._data.ctypes.data_as(self._lib.llama_token_data_p)
        array.size, array.selected, array.sorted = len(ids), -1, False
        return data

    def penalized(self) -> np.ndarray:
        """A copy of the logits of a whole-vocabulary array after samplers that change logits
        in place and keep the order (the penalties)."""
        return self._data["logit"].copy()

    def pointer(self) -> Any:
        return ctypes.byref(self.array)

    def selected(self) -> int:
        """The token the last sampler chain applied to this array picked. Read through the
        array's own pointer: a sampler may point it at storage of its own."""
        array = self.array
        if not 0 <= array.selected < array.size:
            raise RuntimeError("llama.cpp's samplers selected no token")
        return int(array.data[array.selected].id)


class ChainSampler:
    """llama.cpp's samplers: the penalties, then greedy, or top-k, top-p, min-p, temperature
    and a seeded draw, with an optional grammar sampler kept out of the chain and applied as
    llama-server applies it (`common_sampler_sample` with `grammar_first` false): the chain
    picks a token from the unconstrained logits and the grammar checks only that one token
    (microseconds; most tokens a model picks fit, a half to two thirds even sampled at
    temperature 1.5 from a prompt that is not JSON, in tests/test_json_grammar.py). Only when
    the grammar rejects it does the chain pick again, among the fitting tokens: those that
    `GrammarScan` finds without the whole-vocabulary pass llama-server makes there, which cost
    up to half a CPU second a token with Gemma 3's 262k-token vocabulary, on the scheduler
    thread every sequence of the model waits on. Either way the pick has the distribution of
    the chain applied to the grammar-constrained logits."""

    def __init__(self, lib: Any, candidates: Candidates, penalties: Any, chain: Any, scan: GrammarScan | None = None) -> None:
        """`penalties`, `chain`: llama-cpp-python `LlamaSampler`s (the penalties apart, since a
        redraw needs the penalized logits); `scan`: the grammar's. This sampler owns them all
        from here on, the grammar's `llama_sampler` included, and frees them in `close`."""
        self._lib = lib
        self._candidates = candidates
        self._penalties = penalties
        self._chain = chain
        self._scan = scan
        self._one = lib.llama_token_data()
        self._single = lib.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)

    def sample(self, logits: np.ndarray) -> int:
        """The next token, accepted into the grammar and the chain (penalties' memory)."""
        token = self._pick(logits)
        if self._scan is not None:
            if not self._fits(self._scan.grammar, token):
                token = self._redraw(logits, self._scan)
            self._lib.llama_sampler_accept(self._scan.grammar, token)
        self._accept_chain(token)
        return token

    def _pick(self, logits: np.ndarray) -> int:
        cur = self._candidates.fill(logits)
        self._lib.llama_sampler_apply(self._penalties.sampler, cur)
        self._lib.llama_sampler_apply(self._chain.sampler, cur)
        return self._candidates.selected()

    def _redraw(self, logits: np.ndarray, scan: GrammarScan) -> int:
        """The chain's pick among the fitting tokens (the penalties' apply has no state, so
        applying them again gives the logits the first pick saw)."""
        candidates = self._candidates
        self._lib.llama_sampler_apply(self._penalties.sampler, candidates.fill(logits))
        penalized = candidates.penalized()
        fitting = scan.fitting(penalized)
        if not len(fitting):
            raise InvalidOptions("the output format's grammar allows no token of this model's vocabulary next",
                                 field="format")
        candidates.subset(fitting, penalized[fitting])
        self._lib.llama_sampler_apply(self._chain.sampler, candidates.pointer())
        return candidates.selected()

    def accept(self, token: int) -> None:
        """A token of the output that was not sampled (one the engine wrote itself), into the
        grammar (a lazy grammar's trigger may be in it) and the penalties' memory."""
        if self._scan is not None:
            self._lib.llama_sampler_accept(self._scan.grammar, token)
        self._accept_chain(token)

    def _accept_chain(self, token: int) -> None:
        self._lib.llama_sampler_accept(self._penalties.sampler, token)
        self._lib.llama_sampler_accept(self._chain.sampler, token)

    def _fits(self, grammar: Any, token: int) -> bool:
        """Whether `grammar` allows `token` next: it sets a rejected candidate's logit to -inf."""
        self._one.id, self._one.logit, self._one.p = token, 1.0, 0.0
        self._lib.llama_sampler_apply(grammar, ctypes.byref(self._single))
        return not math.isinf(self._one.logit)

    def close(self) -> None:
        """Free llama.cpp's samplers (a chain frees the samplers added to it)."""
        if self._scan is not None:
            self._lib.llama_sampler_free(self._scan.grammar)
            self._scan = None
        self._penalties.close()
        self._chain.close()
