"""The tokens a grammar lets the sampler chain pick from after the chain's own pick did not fit
(see `ChainSampler`), found without putting the whole vocabulary through the grammar.

llama-server applies the grammar to every token then: with Gemma 3's 262k-token vocabulary,
inside a JSON string (where most tokens fit and each is matched to its end), that costs 50-100
ms of CPU a token on the 2-core test machine (and passed half a second in a CI run), on the
scheduler thread every request of the model waits on.
The chain truncates to the best few candidates anyway, so here the grammar sees the best 256
candidates, then the next 4,096, then the rest, and stops as soon as what it has found settles
the chain's result:
- top-k (and greedy, top-k 1): k fitting tokens found are the k best that fit;
- min-p with no top-k or top-p: every unseen token is below the best fitting one times min-p;
- no truncation at all: a token drawn from the whole distribution that fits is a draw from
  the constrained one (rejection sampling, a few tries before the scan);
- top-p with no top-k needs every fitting token's mass, so the whole vocabulary is scanned.
The chain then runs on the fitting tokens found, so its pick has exactly the distribution it
has with the grammar applied to the whole vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from myllm.runtime.engine.sampling import Candidates

FIRST_CHUNK = 256
"""Candidates in the first chunk: where most tokens fit (inside a JSON string), the best 256 by
logit hold the 40 that top-k keeps, and checking them costs ~1/400 of the whole pass."""
SECOND_CHUNK = 4096
"""The next best, checked when the first chunk does not settle the pick."""
REJECTION_TRIES = 32
"""Draws from the untruncated distribution tried before the scan: each costs one token's check."""
MIN_P_MARGIN = 1e-3
"""Kept below min-p's cut: llama.cpp computes it in single precision."""


@dataclass(frozen=True)
class Truncation:
    """What the chain keeps of the candidates (llama.cpp's top-k, then top-p, then min-p, on the
    penalized logits), and the temperature it draws at (0: greedy)."""

    top_k: int
    top_p: float
    min_p: float
    temperature: float

    @property
    def untruncated(self) -> bool:
        return self.temperature > 0 and self.top_k <= 0 and self.top_p >= 1 and self.min_p <= 0

    def settled(self, found: np.ndarray, logits: np.ndarray, unseen_max: float) -> bool:
        """Whether the fitting tokens `found` (best first), with every token not yet checked at
        most `unseen_max`, hold every token the chain could keep."""
        if not len(found):
            return False
        if self.temperature == 0:  # greedy: the best, unless an unseen token ties with it
            return unseen_max < float(logits[found[0]])
        if self.top_k > 0:
            return len(found) >= self.top_k
        if self.top_p >= 1 and self.min_p > 0:
            return unseen_max < float(logits[found[0]]) + math.log(self.min_p) - MIN_P_MARGIN
        return False


class GrammarScan:
    """The fitting candidates for one request's grammar; on the scheduler thread, with its
    candidates (one user at a time)."""

    def __init__(self, lib: Any, candidates: Candidates, grammar: Any, truncation: Truncation, seed: int) -> None:
        self._lib = lib
        self._candidates = candidates
        self.grammar = grammar
        """A `llama_sampler` pointer, owned by the `ChainSampler` that holds this scan."""
        self.truncation = truncation
        self._rng = np.random.default_rng(seed)

    def fitting(self, logits: np.ndarray) -> np.ndarray:
        """Token ids the chain picks among, from the penalized `logits`: every fitting token it
        could keep, best first (ties by id, as llama.cpp's greedy sampler breaks them)."""
        if self.truncation.untruncated and (token := self._drawn(logits)) is not None:
            return np.array([token], dtype=np.intc)
        n = len(logits)
        first = min(FIRST_CHUNK, n)
        head = (np.argpartition(-logits, first - 1)[:first] if first < n else np.arange(n)).astype(np.intc)
        found = self._fits(head)
        unseen = -math.inf if first == n else float(logits[head].min())
        if unseen > -math.inf and not self.truncation.settled(self._best_first(found, logits), logits, unseen):
            found = np.concatenate([found, self._rest(logits, head, self._promising(len(found)))])
        return self._best_first(found, logits)

    def _promising(self, found: int) -> bool:
        """Whether the next best `SECOND_CHUNK` may settle the pick, judged by the first chunk's
        yield: not when none of the best 256 fit (a state few tokens fit: after `{` only a
        quote or white space), nor when top-k needs more than the first chunk's rate of fitting
        tokens would find there. Such a state gets the whole pass at once."""
        if found == 0:
            return False
        return self.truncation.top_k <= 0 or found * (1 + SECOND_CHUNK / FIRST_CHUNK) >= self.truncation.top_k

    def _rest(self, logits: np.ndarray, head: np.ndarray, second: bool) -> np.ndarray:
        """The fitting tokens among those not in `head`: with `second`, the next best
        `SECOND_CHUNK` first, then (when those do not settle it) all the others in one pass.
        Each chunk is checked in the order of ids: the grammar looks up every candidate's
        text, and in the order of logits those lookups jump about the vocabulary, which made
        the same pass cost twice as much."""
        n = len(logits)
        rest = np.ones(n, dtype=bool)
        rest[head] = False
        ids = np.flatnonzero(rest).astype(np.intc)
        if second and len(ids) > SECOND_CHUNK:
            cut = np.argpartition(-logits[ids], SECOND_CHUNK - 1)
            chunk = np.sort(ids[cut[:SECOND_CHUNK]])
            found = self._fits(chunk)
            unseen = float(logits[ids[cut[SECOND_CHUNK:]]].max())
            if self.truncation.settled(self._best_first(found, logits), logits, unseen):
                return found
            rest[chunk] = False
            return np.concatenate([found, self._fits(np.flatnonzero(rest).astype(np.intc))])
        return self._fits(ids)

    @staticmethod
    def _best_first(ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        return ids[np.lexsort((ids, -logits[ids]))]

    def _drawn(self, logits: np.ndarray) -> int | None:
        """A token drawn from the whole (temperature-scaled) distribution that fits, or None
        after `REJECTION_TRIES` that do not: the first fitting draw is a draw from the
        distribution restricted to fitting tokens. Drawn by inverting the cumulative weights
        (numpy's `choice` with probabilities costs twice as much over 262k tokens)."""
        weights = np.exp((logits - logits.max()) / np.float32(self.truncation.temperature))
        cumulative = np.cumsum(weights, dtype=np.float64)
        tries = np.searchsorted(cumulative, self._rng.random(REJECTION_TRIES) * cumulative[-1], side="right")
        fit = self._fits(np.minimum(tries, len(logits) - 1).astype(np.intc))  # in the order drawn
        return int(fit[0]) if len(fit) else None

    def _fits(self, ids: np.ndarray) -> np.ndarray:
        """The tokens of `ids` the grammar allows next, in their order."""
        view = self._candidates.subset(ids)
        self._lib.llama_sampler_apply(self.grammar, self._candidates.pointer())
        return ids[np.isfinite(view["logit"])]
